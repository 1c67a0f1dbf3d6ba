"""Whether this machine has a device and a dtype can be used, asked before anything is loaded.

torch's own errors for an absent device surface deep inside a load ("Torch not compiled with
CUDA enabled") or not at all until the first kernel; asking up front gives one sentence that
says what exists instead.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def device_problem(device: str | torch.device | None) -> str | None:
    """None when `device` exists on this machine, else why not (and what to use)."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as error:
        return f"{device!r} is not a torch device ({error}); use cpu, cuda, cuda:N or mps"
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return (f"{str(device)!r} was asked for, but torch {torch.__version__} sees no CUDA device on this machine; "
                    "use cpu, or a CUDA build of torch on a machine with a GPU")
        if device.index is not None and device.index >= count:
            return f"{str(device)!r} was asked for, but this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"{str(device)!r} was asked for, but MPS is not available here; use cpu"
    return None


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or its name; `ValueError` naming the supported ones."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


__all__ = ["DTYPES", "device_problem", "resolve_dtype"]
