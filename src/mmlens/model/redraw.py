"""A re-drawn copy of a Hugging Face model, built where the model lives, in the model's dtypes.

The copy is constructed on the meta device (no memory) and materialised one block at a time
(Hugging Face's `_no_split_modules`, the units accelerate places; the tensors outside every block
last): each tensor is allocated on the CPU in the dtype the model keeps it in, drawn by Hugging
Face's own `_init_weights` (every module from a generator seeded by the seed and the module's name,
so the draw is the same whatever the blocks, their order, the device map or the device), or copied
from the model where the caller keeps it, then sent where the model keeps it: its device, or the
offload folder for a disk-offloaded module. A dispatched model's copy is then dispatched by
accelerate on the same device map. Peak memory is the copy itself plus one block in transit.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import InputError, UnsupportedModelError

_DONE = "_is_hf_initialized"  # Hugging Face's flag: its init functions leave a flagged tensor alone


def redrawn_copy(
    model: nn.Module, seed: int, *, keep: Callable[[str], bool] = lambda _key: False,
    offload_folder: str | Path | None = None,
) -> nn.Module:
    """A new model of `model`'s class and config with every tensor drawn by Hugging Face's init
    (seeded), except those whose state_dict key `keep` accepts, which are copied from `model`.
    Each tensor gets the device (or disk offload) and dtype the model gives it; disk-offloaded
    tensors go to `offload_folder` (default: a new folder, removed with the copy, inside the
    model's own offload folder, which the user chose for its size, else in the system's temporary
    folder). The caller's random state is left as it was."""
    trained = _placement_and_dtype(model)
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(model.config))
    fresh_tensors = dict(_tensors(fresh))
    unknown = sorted(set(fresh_tensors) ^ set(trained))
    if unknown:
        raise UnsupportedModelError(
            f"{type(model).__name__}: a model rebuilt from its config has other tensors than the model itself "
            f"({unknown[:5]}); mmlens cannot re-draw it in place; load it without changing its modules")
    folder = _Folder(offload_folder, near=_offload_folder_of(model))
    with torch.random.fork_rng(devices=[]):
        blocks = _blocks(fresh)
        for unit in [_Unit((name,), False) for name in blocks] + [_Unit(tuple(blocks), True)]:
            _build(fresh, model, unit, trained, seed, keep, folder)
    fresh.tie_weights()
    for _key, tensor in _tensors(fresh):
        tensor.__dict__.pop(_DONE, None)
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        from accelerate import dispatch_model

        dispatch_model(fresh, device_map=dict(device_map), offload_dir=str(folder.path) if folder.used else None)
    if folder.used and folder.owned:
        weakref.finalize(fresh, shutil.rmtree, folder.path, True)
    return fresh.eval()


class _Folder:
    """Where disk-offloaded tensors of the copy go: the caller's folder, or a temporary one made
    on first use (an offloaded copy of a large model needs as much disk as its offloaded part)."""

    def __init__(self, path: str | Path | None, near: Path | None = None):
        self.owned, self.near = path is None, near
        self.path = None if path is None else Path(path)
        self.used = False
        if self.path is not None and (self.path / "index.json").exists():
            # accelerate names offloaded files by tensor: a second copy would overwrite the first's
            raise InputError(f"offload_folder {self.path} already holds offloaded weights (index.json); give each "
                             "re-drawn model a folder of its own, or leave offload_folder unset for a temporary one")

    def write(self, tensors: dict[str, Tensor]) -> None:
        from accelerate.utils import offload_state_dict

        if self.path is None:
            self.path = Path(tempfile.mkdtemp(prefix="mmlens-redrawn-", dir=self.near))
        self.path.mkdir(parents=True, exist_ok=True)
        offload_state_dict(str(self.path), tensors)  # adds to the folder's index.json
        self.used = True


def _offload_folder_of(model: nn.Module) -> Path | None:
    """The folder accelerate offloads the model's weights to, if it has one."""
    for module in model.modules():
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        folder = getattr(getattr(weights, "dataset", weights), "save_folder", None)
        if folder and Path(folder).is_dir():
            return Path(folder)
    return None


def _tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Every parameter and buffer by state_dict-style key, tied ones under each of their names."""
    yield from model.named_parameters(remove_duplicate=False)
    yield from ((k, v) for k, v in model.named_buffers(remove_duplicate=False) if v is not None)


def _placement_and_dtype(model: nn.Module) -> dict[str, tuple[torch.device | str, torch.dtype]]:
    """Where (a device, or "disk") and in which dtype the model keeps each tensor."""
    device_map = getattr(model, "hf_device_map", None) or {}

    def placed(key: str, tensor: Tensor) -> torch.device | str:
        owners = [name for name in device_map if name == "" or key == name or key.startswith(f"{name}.")]
        if not owners:
            return tensor.device
        where = device_map[max(owners, key=len)]
        return where if where == "disk" else torch.device("cuda", where) if isinstance(where, int) else torch.device(where)

    return {key: (placed(key, tensor), tensor.dtype) for key, tensor in _tensors(model)}


def _blocks(model: nn.Module) -> list[str]:
    """The names of the blocks: instances of the model's `_no_split_modules` classes, in module order."""
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    blocks: list[str] = []

    def visit(name: str, module: nn.Module) -> None:
        if name and type(module).__name__ in block_classes:
            blocks.append(name)
            return
        for child, submodule in module.named_children():
            visit(f"{name}.{child}" if name else child, submodule)

    visit("", model)
    return blocks


@dataclass(frozen=True)
class _Unit:
    """What is built at once: one block, or (`rest`) every module outside the given blocks."""

    blocks: tuple[str, ...]
    rest: bool

    def holds(self, module_name: str) -> bool:
        inside = any(module_name == block or module_name.startswith(f"{block}.") for block in self.blocks)
        return inside != self.rest


def _owner(key: str) -> str:
    return key.rpartition(".")[0]


def _set(model: nn.Module, key: str, tensor: Tensor) -> Tensor:
    """Put `tensor` in place of the parameter or buffer `key` (a parameter stays a parameter)."""
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    if name in module._parameters:
        old = module._parameters[name]
        tensor = nn.Parameter(tensor, requires_grad=old.requires_grad)
        module._parameters[name] = tensor
    else:
        module._buffers[name] = tensor
    return tensor


def _trained_value(model: nn.Module, key: str) -> Tensor:
    """The model's tensor `key`, read from accelerate's offload store when it is offloaded."""
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    tensor = module._parameters[name] if name in module._parameters else module._buffers[name]
    if tensor.device.type != "meta":
        return tensor
    weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if weights is None:
        raise UnsupportedModelError(f"{key} is on the meta device and no accelerate hook holds its weights; "
                                    "load the model with its weights before building a control from it")
    return weights[name]


def _module_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def _init_in_post_order(model: nn.Module, wanted: Callable[[str], bool], seed: int) -> None:
    """Hugging Face's `initialize_weights` (children before their parent, each module by the
    `_initialize_weights` of the nearest Hugging Face model holding it), restricted to the wanted
    modules, each drawn from its own seeded generator."""
    from transformers import PreTrainedModel

    custom = bool(getattr(model, "is_custom_code", lambda: False)())

    def visit(name: str, module: nn.Module, init: Callable) -> None:
        for child, submodule in module.named_children():
            own = submodule._initialize_weights if isinstance(submodule, PreTrainedModel) else init
            visit(f"{name}.{child}" if name else child, submodule, own)
        if wanted(name):
            torch.manual_seed(_module_seed(seed, name))
            init(module, custom)

    visit("", model, model._initialize_weights)


def _unset(tensor: Tensor) -> Tensor:
    """A fresh allocation whose every value shows when Hugging Face's init leaves it unwritten."""
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        return tensor.fill_(float("nan"))
    return tensor.fill_(torch.iinfo(tensor.dtype).min) if tensor.dtype != torch.bool else tensor


def _unwritten(tensor: Tensor) -> bool:
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        return bool(torch.isnan(tensor.sum()))  # a NaN anywhere makes the sum NaN, with no tensor-sized mask
    return tensor.dtype != torch.bool and bool((tensor == torch.iinfo(tensor.dtype).min).any())


def _build(fresh: nn.Module, model: nn.Module, unit: _Unit, trained: dict, seed: int,
           keep: Callable[[str], bool], folder: _Folder) -> None:
    """Allocate, draw (or copy) and place the tensors of one unit."""
    pending = {key: tensor for key, tensor in _tensors(fresh) if tensor.device.type == "meta" and unit.holds(_owner(key))}
    keys = list(pending)
    drawn_modules = set()
    for key, meta in pending.items():
        dtype = trained[key][1]
        if keep(key):
            # a contiguous copy, laid out like a drawn tensor (DESIGN: float32 matmuls and layout)
            copied = torch.empty(meta.shape, dtype=dtype).copy_(_trained_value(model, key).detach())
            setattr(_set(fresh, key, copied), _DONE, True)
        else:
            _set(fresh, key, _unset(torch.empty(meta.shape, dtype=dtype)))
            drawn_modules.add(_owner(key))
    if drawn_modules:
        _init_in_post_order(fresh, lambda name: unit.holds(name) and _draws(name, drawn_modules), seed)
    current = dict(_tensors(fresh))
    unwritten = [key for key in keys if not keep(key) and _unwritten(current[key])]
    if unwritten:
        raise UnsupportedModelError(
            f"{type(fresh).__name__}: Hugging Face's initialisation leaves {unwritten[:5]} unset, so mmlens cannot "
            "draw a random copy of this model; report the model class")
    disk = {}
    for key in keys:
        where = trained[key][0]
        if where == "disk":
            disk[key] = current[key]
            placed = _set(fresh, key, torch.empty_like(current[key], device="meta"))
        else:
            placed = _set(fresh, key, current[key].to(where)) if current[key].device != where else current[key]
        setattr(placed, _DONE, True)
    if disk:
        folder.write(disk)


def _draws(name: str, drawn_modules: set[str]) -> bool:
    """Whether module `name` holds, itself or below it, a tensor to draw (a parent's init may
    draw its children's tensors)."""
    return any(owner == name or name == "" or owner.startswith(f"{name}.") for owner in drawn_modules)


__all__ = ["redrawn_copy"]
