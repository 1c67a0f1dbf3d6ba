"""Reading the SAE files researchers download into one `SAE`, checked before it is used.

Four sources: SAELens's folder (`cfg.json` + `sae_weights.safetensors`, any SAELens version;
`sae_lens/saes/sae.py` `save_model`), Gemma Scope's `params.npz` (JumpReLU: W_enc, W_dec, b_enc,
b_dec, threshold, no decoder bias subtracted from the input; Lieberum et al. 2024,
arXiv:2408.05147, read as SAELens's `gemma_2_sae_huggingface_loader` does), dictionary-learning's
folder (`ae.pt` + `config.json`, `dictionary_learning/dictionary.py` and `trainers/{top_k,
batch_top_k}.py`; its `nn.Linear` weights are transposed into W_enc [d_in, d_sae] and W_dec
[d_sae, d_in]) and a sae-lens `SAE` object (its `cfg.to_dict()` and `state_dict()`, read without
importing sae-lens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from ..errors import InputError, ModelLoadError
from .config import ARCHITECTURES, THRESHOLD_ARCHITECTURES, SAEConfig
from .sae import CFG_FILENAME, SAE, WEIGHTS_FILENAME

GEMMA_SCOPE_FILENAME = "params.npz"
DICTIONARY_LEARNING_FILES = ("ae.pt", "config.json")


def load_sae(
    source: Any,
    *,
    hook_name: str | None = None,
    hook_name_out: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> SAE:
    """An SAE from a SAELens folder, a Gemma Scope `params.npz`, a dictionary-learning folder
    (or its `ae.pt`), or a sae-lens `SAE` object.

    `hook_name` is the mmlens hook point the SAE reads (an alias is fine; it replaces the one the
    file names, and is needed for Gemma Scope and dictionary-learning files, which name a point of
    another library or none); `hook_name_out` likewise for a transcoder. Missing or misshapen
    tensors, NaN or infinite weights and unknown architectures are refused with a ModelLoadError.
    """
    if isinstance(source, (str, Path)):
        cfg, weights = _read_path(Path(source))
    elif callable(getattr(source, "state_dict", None)) and callable(getattr(getattr(source, "cfg", None), "to_dict", None)):
        cfg, weights = _from_sae_lens_object(source)
    else:
        raise InputError(f"load_sae takes a folder, a file or a sae-lens SAE, got {type(source).__name__}")
    if hook_name is not None:
        cfg.metadata["hook_name"] = hook_name
    if hook_name_out is not None:
        cfg.metadata["hook_name_out"] = hook_name_out
    if dtype is not None:
        cfg.dtype = str(dtype).removeprefix("torch.")
    if device is not None:
        cfg.device = str(device)
    cfg = SAEConfig(**vars(cfg))  # checks dtype and the rest again after the overrides
    return sae_from_weights(cfg, weights)


def sae_from_weights(cfg: SAEConfig, weights: dict[str, Tensor]) -> SAE:
    """An SAE with `cfg` holding `weights` (SAELens's names), once every tensor is present, has the
    shape `cfg` implies and is finite."""
    sae = SAE(cfg)
    expected = {name: tuple(tensor.shape) for name, tensor in sae.state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ModelLoadError(f"the {cfg.architecture} SAE's weights lack {', '.join(missing)} (they have "
                             f"{', '.join(sorted(weights)) or 'nothing'}); load the file the SAE was saved with")
    misshapen = [f"{name} {tuple(weights[name].shape)} (expected {shape})" for name, shape in expected.items()
                 if tuple(weights[name].shape) != shape]
    if misshapen:
        raise ModelLoadError(f"SAE weights whose shape does not match d_in={cfg.d_in}, d_sae={cfg.d_sae}, "
                             f"d_out={cfg.d_out}: {'; '.join(misshapen)}")
    unfinite = [name for name in expected if not torch.isfinite(weights[name]).all()]
    if unfinite:
        raise ModelLoadError(f"SAE weights with NaN or infinite values: {', '.join(unfinite)}; the file is "
                             "damaged or the training diverged")
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            parameter.copy_(weights[name].to(parameter.dtype))
    return sae


def read_sae_config(source: str | Path) -> SAEConfig:
    """The config of the SAE `load_sae(source)` would read, without its weights where the format
    allows: SAELens's cfg.json; the shapes in a Gemma Scope `params.npz`'s array headers; a
    dictionary-learning folder is read whole (its config.json names no widths). Errors are `load_sae`'s (a ModelLoadError)."""
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"no SAE at {path}: the path does not exist")
    if path.is_dir() and (path / CFG_FILENAME).exists():
        saved = json.loads((path / CFG_FILENAME).read_text())
        if saved.get("architecture", "standard") not in ARCHITECTURES:
            raise ModelLoadError(f"{path / CFG_FILENAME}: unknown architecture {saved['architecture']!r}; "
                                 f"known: {', '.join(ARCHITECTURES)}")
        if not (path / WEIGHTS_FILENAME).exists():
            raise ModelLoadError(f"{path} has {CFG_FILENAME} but no {WEIGHTS_FILENAME}")
        return SAEConfig.from_sae_lens_dict(saved)
    if path.name == GEMMA_SCOPE_FILENAME or (path / GEMMA_SCOPE_FILENAME).exists():
        file = path if path.is_file() else path / GEMMA_SCOPE_FILENAME
        shape = _npz_shape(file, ("W_enc", "w_enc"))
        if shape is None:
            raise ModelLoadError(f"{file} lacks W_enc; a Gemma Scope params.npz holds W_enc, W_dec, b_enc, b_dec "
                                 "and threshold")
        return SAEConfig("jumprelu", int(shape[0]), int(shape[1]), apply_b_dec_to_input=False,
                         metadata={"source": "gemma-scope"})
    return _read_path(path)[0]


def _npz_shape(file: Path, names: tuple[str, ...]) -> tuple[int, ...] | None:
    """The shape of the first of `names` in an .npz, read from its array header (no data loaded)."""
    import zipfile

    with zipfile.ZipFile(file) as archive:
        for name in names:
            if f"{name}.npy" in archive.namelist():
                with archive.open(f"{name}.npy") as handle:
                    version = np.lib.format.read_magic(handle)
                    shape, _, _ = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)(handle)
                    return tuple(shape)
    return None


# ----------------------------------------------------------------- sources
def _read_path(path: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    if not path.exists():
        raise ModelLoadError(f"no SAE at {path}: the path does not exist")
    if path.is_dir() and (path / CFG_FILENAME).exists():
        return _read_sae_lens(path)
    if path.name == GEMMA_SCOPE_FILENAME or (path / GEMMA_SCOPE_FILENAME).exists():
        return _read_gemma_scope(path if path.is_file() else path / GEMMA_SCOPE_FILENAME)
    if path.name == DICTIONARY_LEARNING_FILES[0] or (path / DICTIONARY_LEARNING_FILES[0]).exists():
        return _read_dictionary_learning(path.parent if path.is_file() else path)
    raise ModelLoadError(
        f"no SAE format recognised at {path}: expected a folder with {CFG_FILENAME} and {WEIGHTS_FILENAME} "
        f"(SAELens), a {GEMMA_SCOPE_FILENAME} (Gemma Scope) or a folder with "
        f"{' and '.join(DICTIONARY_LEARNING_FILES)} (dictionary-learning)")


def _read_sae_lens(folder: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    saved = json.loads((folder / CFG_FILENAME).read_text())
    if saved.get("architecture", "standard") not in ARCHITECTURES:
        raise ModelLoadError(f"{folder / CFG_FILENAME}: unknown architecture {saved['architecture']!r}; "
                             f"known: {', '.join(ARCHITECTURES)}")
    cfg = SAEConfig.from_sae_lens_dict(saved)
    if not (folder / WEIGHTS_FILENAME).exists():
        raise ModelLoadError(f"{folder} has {CFG_FILENAME} but no {WEIGHTS_FILENAME}")
    weights = load_file(folder / WEIGHTS_FILENAME)
    _fold_finetuning_scale(weights, saved)
    return cfg, weights


def _fold_finetuning_scale(weights: dict[str, Tensor], saved: dict[str, Any]) -> None:
    """SAELens before 6 scaled features by `scaling_factor` before decoding (its
    `finetuning_scaling_factor`); folding the scale into W_dec's rows gives the same output."""
    scale = weights.pop("scaling_factor", None)
    if scale is not None and not torch.allclose(scale, torch.ones_like(scale)):
        if not saved.get("finetuning_scaling_factor"):
            raise ModelLoadError("the weights hold a scaling_factor that is not 1 but cfg.json's "
                                 "finetuning_scaling_factor is false: the folder mixes two SAEs")
        weights["W_dec"] = weights["W_dec"] * scale[:, None]


def _read_gemma_scope(file: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    with np.load(file) as data:
        # SAELens's loader accepts lower-case w_enc / w_dec as well
        weights = {("W_" + key[2:] if key.startswith("w_") else key): torch.from_numpy(np.array(data[key])).float()
                   for key in data.files}
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        if name not in weights:
            raise ModelLoadError(f"{file} lacks {name} (it has {', '.join(sorted(weights))}); a Gemma Scope "
                                 "params.npz holds W_enc, W_dec, b_enc, b_dec and threshold")
    d_in, d_sae = weights["W_enc"].shape
    return SAEConfig("jumprelu", d_in, d_sae, apply_b_dec_to_input=False,
                     metadata={"source": "gemma-scope"}), weights


# dictionary-learning class -> (architecture, subtracts b_dec from the input)
_DICTIONARY_CLASSES = {
    "AutoEncoder": ("standard", True),
    "JumpReluAutoEncoder": ("jumprelu", False),
    "AutoEncoderTopK": ("topk", True),
    "BatchTopKSAE": ("batchtopk", True),
}


def _read_dictionary_learning(folder: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    if not (folder / DICTIONARY_LEARNING_FILES[1]).exists():
        raise ModelLoadError(f"{folder} has ae.pt but no config.json, which names the dictionary class")
    trainer = json.loads((folder / DICTIONARY_LEARNING_FILES[1]).read_text()).get("trainer", {})
    dict_class = trainer.get("dict_class")
    if dict_class not in _DICTIONARY_CLASSES:
        raise ModelLoadError(f"{folder / 'config.json'}: dictionary class {dict_class!r} is not supported; "
                             f"known: {', '.join(_DICTIONARY_CLASSES)}")
    state = torch.load(folder / DICTIONARY_LEARNING_FILES[0], map_location="cpu", weights_only=True)
    architecture, subtracts_b_dec = _DICTIONARY_CLASSES[dict_class]
    if architecture == "jumprelu":
        weights = dict(state)
    else:
        needed = ["encoder.weight", "encoder.bias", "decoder.weight", "bias" if architecture == "standard" else "b_dec"]
        absent = [name for name in needed if name not in state]
        if absent:
            raise ModelLoadError(f"{folder / 'ae.pt'} ({dict_class}) lacks {', '.join(absent)}")
        weights = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"],
                   "W_dec": state["decoder.weight"].T, "b_dec": state[needed[-1]]}
    if "W_enc" not in weights:
        raise ModelLoadError(f"{folder / 'ae.pt'} ({dict_class}) lacks W_enc (it has {', '.join(sorted(state))})")
    d_in, d_sae = weights["W_enc"].shape
    k = int(state["k"]) if "k" in state else trainer.get("k")
    if architecture == "batchtopk":
        # dictionary-learning's inference keeps ReLU'd acts above one scalar threshold, which for
        # a threshold >= 0 is SAELens's JumpReLU with that threshold on every feature (an unset
        # threshold, -1, keeps every positive act: plain ReLU either way)
        weights["threshold"] = torch.ones(d_sae) * state["threshold"].float()
    metadata = {key: trainer[key] for key in ("lm_name", "layer", "submodule_name") if key in trainer}
    cfg = SAEConfig(architecture, d_in, d_sae, k=k if architecture in ("topk", "batchtopk") else None,
                    apply_b_dec_to_input=subtracts_b_dec, metadata=metadata | {"source": "dictionary_learning"})
    return cfg, weights


def _from_sae_lens_object(sae: Any) -> tuple[SAEConfig, dict[str, Tensor]]:
    saved = sae.cfg.to_dict()
    weights = {name: tensor.detach() for name, tensor in sae.state_dict().items()}
    # training SAEs keep log_threshold (JumpReLU) or one topk_threshold (BatchTopK); SAELens turns
    # both into `threshold` when it saves for inference
    if "log_threshold" in weights:
        weights["threshold"] = weights.pop("log_threshold").exp()
    if "topk_threshold" in weights:
        weights["threshold"] = torch.ones_like(weights["b_enc"]) * weights.pop("topk_threshold").to(weights["b_enc"].dtype)
        saved["architecture"] = "batchtopk"
    if saved.get("architecture") not in ARCHITECTURES:
        raise ModelLoadError(f"sae-lens SAE of architecture {saved.get('architecture')!r} is not supported; "
                             f"known: {', '.join(ARCHITECTURES)}")
    metadata = saved.get("metadata")
    saved["metadata"] = dict(metadata) if isinstance(metadata, dict) else dict(getattr(metadata, "to_dict", dict)())
    if saved["architecture"] not in THRESHOLD_ARCHITECTURES:
        weights.pop("threshold", None)
    saved["dtype"] = str(saved.get("dtype", "float32")).removeprefix("torch.")
    return SAEConfig.from_sae_lens_dict(saved), weights
