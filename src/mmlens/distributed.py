"""Data parallelism on torch.distributed: which images a rank takes, and how its sums are combined.

Under `torchrun` (or any initialised process group) every rank runs the same code on a shard of
the images. Ranks take whole batches in turn (batch b goes to rank b mod world size), so every
batch holds exactly the images a single process would put in it: per-image results are the same
computation as in one process, and collecting them in batch order gives the single-process table.
Per-batch results go to rank 0 as they are produced (`ToMain`), one round of batches at a time,
so no rank but 0 ever holds more than its current batch. Sums (ridge statistics, logistic loss
and gradient) are all-reduced in float64; `group=None` with no initialised process group is one
process, and every function here is then the identity.

Two limits on waiting: collectives between ranks that work in step (a round of batches, a sum)
fail after `collective_timeout_s` (a hung or lost rank is reported in minutes, not hours), while
`wait_for_main` (the other ranks waiting while rank 0 alone loads, writes a stage or builds the
report, which can take longer than any sensible collective limit) runs on a second, gloo group
with a limit of its own (`MAIN_WAIT`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")
_local_depth = 0  # > 0 inside `alone()`: this rank works by itself
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
# how long the other ranks wait for rank 0's work alone (writing a 72B sweep's tables, a report)
MAIN_WAIT = timedelta(hours=24)
_main_wait_group: Any = None  # the gloo group `wait_for_main` uses (None: the default group)


def active(group: Any = None) -> bool:
    """Whether more than one process takes part (a group was given, or torchrun started us)."""
    return (_local_depth == 0 and dist.is_available() and dist.is_initialized()
            and dist.get_world_size(group) > 1)


@contextmanager
def alone() -> Iterator[None]:
    """This rank computes by itself in the block (e.g. a stage only rank 0 runs): every function
    here acts as in one process, so nothing waits for ranks that are not taking part."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def rank(group: Any = None) -> int:
    """This process's rank in `group` (0 when no process group is active)."""
    return dist.get_rank(group) if active(group) else 0


def world_size(group: Any = None) -> int:
    """How many processes `group` holds (1 when no process group is active)."""
    return dist.get_world_size(group) if active(group) else 1


def is_main(group: Any = None) -> bool:
    """Rank 0 (or the only process): the one that writes files and prints."""
    return rank(group) == 0


def batch_starts(n: int, batch_size: int, group: Any = None) -> list[int]:
    """The start offsets of this rank's batches over n items: batch b to rank b mod world size."""
    starts = list(range(0, n, batch_size))
    return starts[rank(group) :: world_size(group)]


def share(n: int, batch_size: int, group: Any = None) -> int:
    """How many of n items this rank's batches hold (for progress bars)."""
    return sum(min(batch_size, n - start) for start in batch_starts(n, batch_size, group))


class ToMain:
    """Per-batch results sent to rank 0 as they are made: `add(number, item)` after each of this
    rank's batches, `finish()` after the last; then `items` holds every rank's items in batch
    order on rank 0 and is empty elsewhere. Each `add` is one round (every rank's next batch,
    gathered to rank 0), so a rank keeps only its current batch; a rank with fewer batches than
    the others sends empty rounds in `finish`. Every rank of `group` must take part."""

    def __init__(self, n: int, batch_size: int, group: Any = None):
        self.group = group
        self.rounds = -(-len(range(0, n, batch_size)) // world_size(group))
        self.sent = 0
        self._items: list[tuple[int, Any]] = []

    def add(self, number: int, item: Any) -> None:
        self._send([(number, item)])

    def finish(self) -> "ToMain":
        while self.sent < self.rounds:
            self._send([])
        return self

    def _send(self, items: list[tuple[int, Any]]) -> None:
        self.sent += 1
        received = _pairs_to_main(items, self.group)
        if received is not None:
            self._items += received

    @property
    def items(self) -> list[Any]:
        if self.sent < self.rounds:
            raise RuntimeError("ToMain.items before finish(): some ranks have rounds left to send")
        return _in_order(self._items)


def gather_to_main(items: Sequence[tuple[int, T]], group: Any = None) -> list[T] | None:
    """Every rank's (order key, item) pairs, merged and sorted by key, on rank 0; None elsewhere
    (for small results: per-batch ones go to rank 0 as they are made, with `ToMain`)."""
    received = _pairs_to_main(list(items), group)
    return None if received is None else _in_order(received)


def _pairs_to_main(pairs: list[tuple[int, Any]], group: Any = None) -> list[tuple[int, Any]] | None:
    """Every rank's pairs, concatenated on rank 0 (this rank's own in one process); None elsewhere."""
    if not active(group):
        return pairs
    received: list[Any] | None = [None] * world_size(group) if is_main(group) else None
    dst = dist.get_global_rank(group, 0) if group is not None else 0
    dist.gather_object(pairs, received, dst=dst, group=group)
    return None if received is None else [pair for part in received for pair in part]


def _in_order(pairs: Iterable[tuple[int, T]]) -> list[T]:
    """The items of (order key, item) pairs, sorted by key."""
    return [item for _, item in sorted(pairs, key=lambda pair: pair[0])]


def map_batches(n: int, batch_size: int, fn: Callable[[int, int], T], group: Any = None) -> list[T]:
    """`fn(start, stop)` over this rank's batches of n items, every rank's results gathered in
    batch order: the list one process would make (e.g. a head sweep per batch of images)."""
    mine = [(start, fn(start, min(start + batch_size, n))) for start in batch_starts(n, batch_size, group)]
    return gather_in_order(mine, group)


def all_reduce_sum(tensor: Tensor, group: Any = None) -> Tensor:
    """Sum `tensor` over ranks in place (float64 sums stay float64); a no-op in one process."""
    if active(group):
        device = tensor.device
        # gloo reduces CPU tensors only; NCCL reduces CUDA tensors only: follow the backend
        backend_device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        moved = tensor.to(backend_device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
        if moved is not tensor:
            tensor.copy_(moved.to(device))
    return tensor


def gather_in_order(items: Sequence[tuple[int, T]], group: Any = None) -> list[T]:
    """Every rank's (order key, item) pairs, merged and sorted by key, on every rank."""
    items = list(items)
    if active(group):
        everyone: list[Any] = [None] * world_size(group)
        dist.all_gather_object(everyone, items, group=group)
        items = [pair for part in everyone for pair in part]
    return _in_order(items)


def broadcast_object(value: T, group: Any = None) -> T:
    """Rank 0's `value` on every rank."""
    if not active(group):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def barrier(group: Any = None) -> None:
    """Wait for every rank, bounded by the collective timeout (for ranks working in step)."""
    if active(group):
        dist.barrier(group=group)


def wait_for_main(group: Any = None) -> None:
    """Every rank waits here until all have arrived, for up to `MAIN_WAIT`: the place where ranks
    other than 0 wait while rank 0 alone loads the model, writes a stage's results, runs a stage
    of its own or builds the report. A barrier on the default group would be bounded by the
    collective timeout, and with NCCL a long wait also trips its watchdog; a store-based wait
    would poll. A second group on gloo (CPU sockets, any backend beside it) with its own long
    timeout waits without polling, and a rank that dies closes its sockets, so the others fail
    at once rather than after the limit."""
    if not active(group):
        return
    if group is None and _main_wait_group is not None:
        dist.monitored_barrier(group=_main_wait_group, timeout=MAIN_WAIT, wait_all_ranks=True)
    else:
        dist.barrier(group=group)


def init_from_environment(gpu: int | None = None,
                          collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on CUDA device `gpu` (the
    first GPU this rank's model uses, `placement.collective_gpu`), gloo when `gpu` is None (a
    model on the CPU), with collectives failing after `collective_timeout_s` seconds (the long
    waits for rank 0 go through `wait_for_main`); returns whether this process is part of a
    multi-process run."""
    global _main_wait_group
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return active()
    if not (collective_timeout_s > 0 and collective_timeout_s != float("inf")):
        raise ValueError(f"collective_timeout_s must be a positive number of seconds, got {collective_timeout_s!r}")
    backend = "gloo" if gpu is None else "nccl"
    if gpu is not None:
        torch.cuda.set_device(gpu)  # NCCL runs each rank's collectives on its current device
    dist.init_process_group(backend, timeout=timedelta(seconds=collective_timeout_s))
    _main_wait_group = dist.new_group(backend="gloo", timeout=MAIN_WAIT)
    return active()


def shutdown() -> None:
    """Leave the process group this process joined (the end of a torchrun run)."""
    global _main_wait_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _main_wait_group = None


__all__ = ["DEFAULT_COLLECTIVE_TIMEOUT_S", "MAIN_WAIT", "ToMain", "active", "all_reduce_sum", "alone", "barrier",
           "batch_starts", "broadcast_object", "gather_in_order", "gather_to_main", "init_from_environment", "is_main",
           "map_batches", "rank", "share", "shutdown", "wait_for_main", "world_size"]
