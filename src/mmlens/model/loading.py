"""Finding and loading a Hugging Face checkpoint: shipped name, local directory or hub id.

Nothing here installs packages or reaches the network unless the user names a hub model; with
`HF_HUB_OFFLINE=1`, or when one quick request finds the hub unreachable, only the local cache is
consulted (no retries), and a miss says how to fix it. Models
loadable by name are registered from above (`mmlens.zoo` registers the shipped ones), so the
model layer never imports the zoo.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoProcessor

from ..errors import HubUnavailableError, InputError, ModelLoadError, UnsupportedModelError
from .architectures import ARCHITECTURES
from .runtime.devices import device_map_problem, device_problem, resolve_dtype

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


_CHECKPOINT_SOURCES: list[Callable[[], Mapping[str, Path]]] = []


def register_checkpoint_source(source: Callable[[], Mapping[str, Path]]) -> None:
    """Add a function listing checkpoints loadable by name (name -> local folder)."""
    if source not in _CHECKPOINT_SOURCES:
        _CHECKPOINT_SOURCES.append(source)


def shipped_models() -> dict[str, Path]:
    """Every checkpoint loadable by name, from the registered sources."""
    return {name: Path(path) for source in _CHECKPOINT_SOURCES for name, path in source().items()}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """(location, is_local): a shipped model's folder, a local folder, or a hub id."""
    shipped = shipped_models()
    if str(name_or_path) in shipped:
        return str(shipped[str(name_or_path)]), True
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file; expected a directory holding a Hugging Face checkpoint")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face checkpoint folder?")
        if not any((path / f).is_file() for f in WEIGHT_FILES):
            raise FileNotFoundError(
                f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)} next to config.json"
            )
        return str(path), True
    text = str(name_or_path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:  # hub ids are "org/name"
        raise FileNotFoundError(
            f"no such directory: {text}. Shipped models: {sorted(shipped)}"
        )
    return str(name_or_path), False


def load_hf_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    load_processor: bool = True,
    device_map: str | dict[str, str | int] | None = None,
    max_memory: dict[str | int, str | int] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> tuple[nn.Module, object | None]:
    """Load the model class named in the checkpoint's config, and its processor. `device_map`,
    `max_memory` and `offload_folder` go to Hugging Face (accelerate places the layers)."""
    problem = device_problem(device)
    if problem:
        raise InputError(f"device {problem}")
    if device_map is not None and device is not None:
        raise InputError("pass device or device_map, not both: a device map already says where every layer goes")
    for placed in (device_map.values() if isinstance(device_map, dict) else ()):
        problem = None if placed in ("cpu", "disk") else device_problem(f"cuda:{placed}" if isinstance(placed, int) else placed)
        if problem:
            raise InputError(f"device_map: {problem}")
    if isinstance(device_map, dict) and "disk" in device_map.values() and offload_folder is None:
        raise InputError("device_map sends layers to 'disk': pass offload_folder= (where their weights are kept)")
    try:
        dtype = resolve_dtype(dtype)
    except ValueError as error:
        raise InputError(str(error)) from None
    location, is_local = resolve_checkpoint(name_or_path)
    # One quick look at the hub instead of Hugging Face's retries (about 23 s) when it is down: a
    # hub id then loads from the local cache, as with HF_HUB_OFFLINE, or fails at once.
    unreachable = None if is_local or _offline() else _hub_problem()
    local_only = is_local or _offline() or unreachable is not None
    if is_local:
        config = _local_config(Path(location))
    else:
        config = _hub_config(name_or_path, location, local_only, unreachable)
    class_name = (config.architectures or [None])[0]
    if class_name not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{name_or_path!r} is a {class_name}; supported architectures: {sorted(ARCHITECTURES)}"
        )
    # before the weights: a missing package would otherwise surface as an ImportError inside Hugging Face
    missing = ARCHITECTURES[class_name].environment_problem(config)
    if missing:
        raise ModelLoadError(f"{name_or_path!r} is a {class_name}, which cannot be built here: {missing}")
    model_class = getattr(transformers, class_name)
    problem = device_map_problem(model_class, config, device_map) if isinstance(device_map, dict) else None
    if problem:
        raise InputError(problem)
    kwargs = {"local_files_only": local_only}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    kwargs.update({k: (str(v) if k == "offload_folder" else v) for k, v in placement.items() if v is not None})
    try:
        model = model_class.from_pretrained(location, **kwargs).eval()
    except Exception as error:  # safetensors, torch and transformers each raise their own kinds
        if not is_local:
            raise
        raise ModelLoadError(
            f"the weights in {location} cannot be loaded ({type(error).__name__}: {str(error)[:300]}); the file is "
            "damaged or truncated (an interrupted download or copy?): copy the checkpoint again"
        ) from error
    if device is not None:
        model = model.to(device)
    processor = None
    if load_processor:
        try:
            processor = AutoProcessor.from_pretrained(location, local_files_only=local_only)
        except (OSError, ValueError, ImportError) as error:
            raise FileNotFoundError(
                f"{name_or_path!r} has weights but its processor could not be loaded ({error}); "
                "pass load_processor=False and build inputs yourself, or add the processor files"
            ) from error
    return model, processor


def _local_config(location: Path):
    """The config of a local checkpoint; a broken config.json is named as such (not as a cache miss)."""
    try:
        return AutoConfig.from_pretrained(location, local_files_only=True)
    except Exception as error:
        raise ModelLoadError(
            f"{location / 'config.json'} cannot be read as a Hugging Face config ({type(error).__name__}: "
            f"{str(error)[:300]}); fix or replace that file"
        ) from error


def _hub_problem(timeout_s: float = 3.0) -> str | None:
    """Why the hub cannot be reached (one request, no retries), or None when it answers at all."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)
    except Exception as error:  # noqa: BLE001 - DNS, refused, timeout, proxy: each its own kind
        return f"{constants.ENDPOINT} cannot be reached ({type(error).__name__}: {str(error)[:120]})"
    return None


def _hub_config(name_or_path, location: str, local_only: bool, unreachable: str | None = None):
    try:
        return AutoConfig.from_pretrained(location, local_files_only=local_only)
    except OSError as error:
        remedy = (f"Download it where the hub is reachable (`hf download {name_or_path}`) or pass a local "
                  f"checkpoint directory. Shipped models: {sorted(shipped_models())}")
        if unreachable is not None:
            raise HubUnavailableError(
                f"cannot load {name_or_path!r}: {unreachable} and it is not in the local cache. {remedy}"
            ) from error
        hint = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if _offline()
            else "the id does not exist on the hub (or is private: log in with `hf auth login`)"
        )
        raise FileNotFoundError(f"cannot load {name_or_path!r}: {hint}. {remedy}") from error
