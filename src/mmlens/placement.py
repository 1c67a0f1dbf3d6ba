"""Where each process of a torchrun run puts its model: one GPU per rank, or a split over its own GPUs.

Under torchrun every rank loads its own copy of the model. With `device: cuda` (or `auto` on a
machine with a GPU) the rank with LOCAL_RANK r takes `cuda:r`. With a `device_map` each rank
splits its copy over GPUs of its own: a node's G GPUs are shared out evenly among its L ranks
(LOCAL_WORLD_SIZE), k = G / L each, so rank r owns `cuda:r*k` .. `cuda:r*k+k-1`; accelerate
places the layers within them (`max_memory` lists only those GPUs, plus 1/L of the host memory
for layers it offloads to the CPU). G must be a positive multiple of L; anything else is refused
with this rule. In one process (no torchrun) `cuda` and a `device_map` mean what they mean in
torch and accelerate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from . import distributed
from .errors import InputError
from .model.runtime.devices import device_problem

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's named strategies


@dataclass(frozen=True)
class NodeSlot:
    """This process's place among the ranks of its node (torchrun's LOCAL_RANK, LOCAL_WORLD_SIZE)."""

    local_rank: int = 0
    local_world_size: int = 1
    several: bool = False  # part of a multi-process run (on this node or across nodes)

    @classmethod
    def from_environment(cls) -> "NodeSlot":
        """From torchrun's variables; a process group set up without them counts as one node."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
            return cls(int(os.environ["LOCAL_RANK"]),
                       int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])), True)
        if distributed.active():
            return cls(distributed.rank(), distributed.world_size(), True)
        return cls()


def visible_gpus() -> int:
    """CUDA devices this process can see (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def rank_gpus(n_gpus: int, slot: NodeSlot, split: bool) -> list[int]:
    """The CUDA devices (indices) a rank owns: its LOCAL_RANK, or with `split` (a device map) its
    k = n_gpus / LOCAL_WORLD_SIZE consecutive GPUs. `InputError` stating the rule when the node
    cannot give every rank its share."""
    r, ranks = slot.local_rank, slot.local_world_size
    if not split:
        if r >= n_gpus:
            raise InputError(f"torchrun started {ranks} processes on this node and each takes one GPU (rank r on "
                             f"cuda:r), but the node has {n_gpus} CUDA device(s): LOCAL_RANK {r} has none. Start at most "
                             f"{n_gpus} processes per node (--nproc-per-node {n_gpus})" if n_gpus else
                             "torchrun ranks asked for CUDA, but this node has no CUDA device; use device: cpu")
        return [r]
    rule = ("device_map under torchrun splits each rank's model over GPUs of its own: the node's GPUs are shared "
            "out evenly, k = GPUs / processes per node each (rank r on cuda:r*k .. r*k+k-1)")
    if not n_gpus:
        raise InputError(f"{rule}, but this node has no GPU; use device: cpu (or auto) without a device_map")
    if n_gpus < ranks or n_gpus % ranks:
        raise InputError(f"{rule}. This node has {n_gpus} GPU(s) for {ranks} processes; start a number of processes "
                         f"per node that divides {n_gpus} (e.g. --nproc-per-node {_divisor_below(n_gpus, ranks)})")
    k = n_gpus // ranks
    return list(range(r * k, (r + 1) * k))


def rank_max_memory(available: dict[Any, int], gpus: list[int], slot: NodeSlot) -> dict[Any, int]:
    """accelerate's `max_memory` for one rank: its own GPUs at what they have free, and an equal
    share of the host memory (every rank of the node offloads into the same RAM)."""
    missing = [g for g in gpus if g not in available]
    if missing:
        raise InputError(f"no memory figure for GPU(s) {missing}; known devices: {sorted(map(str, available))}")
    out: dict[Any, int] = {g: int(available[g]) for g in gpus}
    if "cpu" in available:
        out["cpu"] = int(available["cpu"]) // slot.local_world_size
    return out


def resolve_device(device: str, n_gpus: int, slot: NodeSlot) -> str:
    """`auto`: a GPU when there is one, else the CPU; under torchrun `cuda` is the rank's own GPU."""
    if device == "auto":
        device = "cuda" if n_gpus else "cpu"
    if device == "cuda" and slot.several:
        device = f"cuda:{rank_gpus(n_gpus, slot, split=False)[0]}"
    return device


def placement_problem(device: str, device_map: str | None, *, n_gpus: int | None = None,
                      slot: NodeSlot | None = None) -> str | None:
    """None when this process can place its model as configured, else why not (one sentence)."""
    n_gpus = visible_gpus() if n_gpus is None else n_gpus
    slot = NodeSlot.from_environment() if slot is None else slot
    try:
        if device_map is not None:
            if device_map not in DEVICE_MAPS:
                return f"device_map: must be one of {', '.join(DEVICE_MAPS)}, got {device_map!r}"
            if slot.several:
                rank_gpus(n_gpus, slot, split=True)
            return None
        if slot.several and slot.local_world_size > 1 and device.startswith("cuda:"):
            return (f"device: {device!r} names one GPU for all {slot.local_world_size} processes of this node; under "
                    "torchrun use device: cuda (or auto), and each rank takes cuda:LOCAL_RANK")
        problem = device_problem(resolve_device(device, n_gpus, slot), cuda_count=n_gpus)
        return f"device: {problem}" if problem else None
    except InputError as error:
        return str(error)


def rank_placement(device: str, device_map: str | None, *, n_gpus: int | None = None, slot: NodeSlot | None = None,
                   available: dict[Any, int] | None = None) -> dict[str, Any]:
    """The `HookedMLLM.from_pretrained` keywords that place this rank's model: `device`, or
    `device_map` with `max_memory` limited to the rank's GPUs under torchrun. `available`
    (device -> bytes; default: what the rank's GPUs and the host have free) is what each can hold."""
    n_gpus = visible_gpus() if n_gpus is None else n_gpus
    slot = NodeSlot.from_environment() if slot is None else slot
    problem = placement_problem(device, device_map, n_gpus=n_gpus, slot=slot)
    if problem:
        raise InputError(problem)
    if device_map is None:
        return {"device": resolve_device(device, n_gpus, slot)}
    if not slot.several:
        return {"device_map": device_map}
    gpus = rank_gpus(n_gpus, slot, split=True)
    available = _free_memory(gpus) if available is None else available
    return {"device_map": device_map, "max_memory": rank_max_memory(available, gpus, slot)}


def collective_gpu(device: str, device_map: str | None) -> int | None:
    """The CUDA device this rank's NCCL collectives run on (the first GPU its model uses), or
    None when its model is on the CPU (gloo). `InputError` when the placement is impossible."""
    n_gpus, slot = visible_gpus(), NodeSlot.from_environment()
    problem = placement_problem(device, device_map, n_gpus=n_gpus, slot=slot)
    if problem:
        raise InputError(problem)
    if device_map is not None:
        return rank_gpus(n_gpus, slot, split=True)[0] if slot.several else (0 if n_gpus else None)
    target = torch.device(resolve_device(device, n_gpus, slot))
    if target.type != "cuda":
        return None
    return target.index if target.index is not None else torch.cuda.current_device()


def _free_memory(gpus: list[int]) -> dict[Any, int]:
    """Free bytes on the given GPUs and in host memory, as accelerate measures them (asking only
    about the rank's own GPUs: a query makes a CUDA context on the device it names)."""
    import psutil  # installed with accelerate, which measures free memory the same way

    return {**{g: torch.cuda.mem_get_info(g)[0] for g in gpus}, "cpu": psutil.virtual_memory().available}


def _divisor_below(n: int, m: int) -> int:
    """The largest number of processes at most m that divides n GPUs."""
    return max(d for d in range(1, min(n, m) + 1) if n % d == 0)


__all__ = ["DEVICE_MAPS", "NodeSlot", "collective_gpu", "placement_problem", "rank_gpus", "rank_max_memory",
           "rank_placement", "resolve_device", "visible_gpus"]
