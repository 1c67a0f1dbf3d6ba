"""Data parallelism on torch.distributed: which images a rank takes, and how its sums are combined.

Under `torchrun` (or any initialised process group) every rank runs the same code on a shard of
the images. Ranks take whole batches in turn (batch b goes to rank b mod world size), so every
batch holds exactly the images a single process would put in it: per-image results are the same
computation as in one process, and gathering them in batch order gives the single-process table.
Sums (ridge statistics, logistic loss and gradient) are all-reduced in float64; `group=None` with
no initialised process group is one process, and every function here is then the identity.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")
_local_depth = 0  # > 0 inside `alone()`: this rank works by itself


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
    return dist.get_rank(group) if active(group) else 0


def world_size(group: Any = None) -> int:
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
    return [item for _, item in sorted(items, key=lambda pair: pair[0])]


def broadcast_object(value: T, group: Any = None) -> T:
    """Rank 0's `value` on every rank."""
    if not active(group):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def barrier(group: Any = None) -> None:
    if active(group):
        dist.barrier(group=group)


def init_from_environment(gpu: int | None = None) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on CUDA device `gpu` (the
    first GPU this rank's model uses, `placement.collective_gpu`), gloo when `gpu` is None (a
    model on the CPU); returns whether this process is part of a multi-process run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return active()
    backend = "gloo" if gpu is None else "nccl"
    if gpu is not None:
        torch.cuda.set_device(gpu)  # NCCL runs each rank's collectives on its current device
    # ranks other than 0 wait while rank 0 writes a stage's results and the report: allow hours
    dist.init_process_group(backend, timeout=timedelta(hours=12))
    return active()


def shutdown() -> None:
    """Leave the process group this process joined (the end of a torchrun run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["active", "all_reduce_sum", "alone", "barrier", "batch_starts", "broadcast_object", "gather_in_order",
           "init_from_environment", "is_main", "map_batches", "rank", "share", "shutdown", "world_size"]
