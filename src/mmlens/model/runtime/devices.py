"""Devices: whether one exists (asked before anything loads), and models dispatched by accelerate.

torch's own errors for an absent device surface deep inside a load ("Torch not compiled with
CUDA enabled") or not at all until the first kernel; asking up front gives one sentence that
says what exists instead. A model loaded with a `device_map` carries accelerate hooks on its
modules (`_hf_hook`): they move inputs to the module's device and load offloaded weights around
its forward. Our instrumented forwards must run inside those hooks, never around them, so they
replace accelerate's inner `_old_forward` instead of `forward` when a module has one.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

_ORIGINAL = "_mmlens_original_forward"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def device_problem(device: str | torch.device | None, cuda_count: int | None = None) -> str | None:
    """None when `device` exists on this machine (with `cuda_count` CUDA devices; default: as many
    as torch sees), else why not (and what to use)."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as error:
        return f"{device!r} is not a torch device ({error}); use cpu, cuda, cuda:N or mps"
    if device.type == "cuda":
        count = cuda_count if cuda_count is not None else torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return (f"{str(device)!r} was asked for, but torch {torch.__version__} sees no CUDA device on this machine; "
                    "use cpu, or a CUDA build of torch on a machine with a GPU")
        if device.index is not None and device.index >= count:
            return f"{str(device)!r} was asked for, but this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"{str(device)!r} was asked for, but MPS is not available here; use cpu"
    return None


def device_map_problem(model_class: type[nn.Module], config, device_map: dict[str, str | int]) -> str | None:
    """None when a module-name -> device map names only modules (or parameters) of the model and
    gives every parameter a place, else what is wrong. Asked of the model built on the meta device
    (no memory) before loading, so a typo in a name is not mistaken for a damaged checkpoint."""
    import copy
    import difflib

    with torch.device("meta"):
        skeleton = model_class(copy.deepcopy(config))
    names = {name for name, _ in skeleton.named_modules()} | {name for name, _ in skeleton.named_parameters()}
    unknown = [key for key in device_map if key not in names]
    if unknown:
        close = {key: difflib.get_close_matches(key, names, n=1) for key in unknown}
        hints = ", ".join(f"{key!r}" + (f" (did you mean {match[0]!r}?)" if match else "") for key, match in close.items())
        return f"device_map names {hints}, which {type(skeleton).__name__} does not have; use its module names"
    placed = lambda key: any(n == "" or key == n or key.startswith(f"{n}.") for n in device_map)  # noqa: E731
    parameters = [key for key, _ in skeleton.named_parameters()]
    homeless = [key for key in parameters if not placed(key)]
    if homeless:
        modules = _outermost_modules(parameters, set(homeless))
        return (f"device_map gives no device to {len(homeless)} parameter(s): those of {', '.join(modules[:4])}"
                f"{' and more' if len(modules) > 4 else ''}; add an entry for each of those modules")
    return None


def _outermost_modules(parameters: list[str], chosen: set[str]) -> list[str]:
    """The outermost modules all of whose parameters are among `chosen` (each chosen parameter once)."""
    counts: dict[str, list[int]] = {}
    for key in parameters:
        parts = key.split(".")
        for i in range(1, len(parts)):
            count = counts.setdefault(".".join(parts[:i]), [0, 0])
            count[0] += 1
            count[1] += key in chosen
    out = []
    for key in parameters:
        if key in chosen:
            parts = key.split(".")
            prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]
            out.append(next((p for p in prefixes if counts[p][0] == counts[p][1]), key))
    return list(dict.fromkeys(out))


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or its name; `ValueError` naming the supported ones."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dispatched(module: nn.Module) -> bool:
    """Whether accelerate wrapped this module's forward (a model loaded with a device_map)."""
    return hasattr(module, "_hf_hook") and hasattr(module, "_old_forward")


def bare_forward(module: nn.Module) -> Callable:
    """The module's forward without our instrumentation and inside accelerate's hook, if any."""
    return module._old_forward if dispatched(module) else module.forward


def override_forward(module: nn.Module, forward: Callable) -> None:
    """Run `forward` when the module is called. Under accelerate it goes inside the hook, so the
    inputs arrive on the module's device and offloaded weights are loaded while it runs. A model
    dispatched after this call keeps it inside too: accelerate wraps whatever `forward` it finds."""
    if not hasattr(module, _ORIGINAL):
        attribute = "_old_forward" if dispatched(module) else "forward"
        setattr(module, _ORIGINAL, (attribute, module.__dict__.get(attribute)))
    if dispatched(module):
        module._old_forward = forward
    else:
        module.forward = forward  # instance attribute shadows the class method; nn.Module calls it


def restore_forward(module: nn.Module) -> None:
    """Put back the forward `override_forward` replaced, wherever accelerate has moved it since
    (a hook added after the override holds it in `_old_forward`; a hook removed put it in `forward`)."""
    if not hasattr(module, _ORIGINAL):
        return
    attribute, original = getattr(module, _ORIGINAL)
    delattr(module, _ORIGINAL)
    if dispatched(module):
        # accelerate's wrapper stays in `forward` and calls `_old_forward`: it must stay callable
        module._old_forward = original if original is not None else type(module).forward.__get__(module)
    elif original is None or attribute == "_old_forward" and original == type(module).forward.__get__(module):
        module.__dict__.pop("forward", None)
    else:
        module.forward = original


def weights_present(module: nn.Module):
    """A context in which the module's own weights are real tensors on its execution device
    (offloaded weights are `meta` tensors outside its forward)."""
    if getattr(getattr(module, "_hf_hook", None), "offload", False):
        from accelerate.utils import align_module_device

        return align_module_device(module)
    return nullcontext()


def input_device(hf_model: nn.Module) -> torch.device:
    """Where a model's inputs go: the device of its input embeddings (the first parameter may be
    offloaded to `meta`, or on another device than the one the forward starts on)."""
    weight = hf_model.get_input_embeddings().weight
    hook = getattr(hf_model.get_input_embeddings(), "_hf_hook", None)
    if weight.device.type == "meta" and hook is not None and hook.execution_device is not None:
        return torch.device(hook.execution_device)
    return weight.device


__all__ = ["DTYPES", "bare_forward", "device_map_problem", "device_problem", "dispatched", "input_device",
           "override_forward", "resolve_dtype", "restore_forward", "weights_present"]
