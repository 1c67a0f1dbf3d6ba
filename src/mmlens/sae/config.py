"""What an SAE is, as SAELens writes it in `cfg.json`: architecture, widths and the input handling.

The field names and values are SAELens's (`sae_lens/saes/sae.py` `SAEConfig`, `topk_sae.py`,
`transcoder.py`, v6), so a config round-trips through sae-lens; configs written before SAELens 6
(flat keys such as `hook_point`, `activation_fn_str`, `activation_fn_kwargs`) are read the way
`sae_lens.loading.pretrained_sae_loaders.handle_pre_6_0_config` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..errors import ModelLoadError

# SAELens's architecture names. A BatchTopK SAE runs as a JumpReLU at inference (SAELens saves it
# as one); mmlens keeps its k and says so in the metadata.
ARCHITECTURES = ("standard", "jumprelu", "topk", "batchtopk", "transcoder", "jumprelu_transcoder", "skip_transcoder",
                 "jumprelu_skip_transcoder")
THRESHOLD_ARCHITECTURES = ("jumprelu", "batchtopk", "jumprelu_transcoder", "jumprelu_skip_transcoder")
TRANSCODERS = ("transcoder", "jumprelu_transcoder", "skip_transcoder", "jumprelu_skip_transcoder")
SKIP_TRANSCODERS = ("skip_transcoder", "jumprelu_skip_transcoder")  # add W_skip @ x to the output
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
RESHAPES = ("none", "hook_z")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# the metadata key under which mmlens records that a saved "jumprelu" was trained as a BatchTopK
TRAINED_AS = "mmlens_trained_as"
SAE_LENS_FORMAT = "6.0.0"  # the SAELens version whose cfg.json layout `to_sae_lens_dict` writes


@dataclass
class SAEConfig:
    """An SAE's shape and input handling. `metadata` holds what SAELens keeps there: `hook_name`
    (an mmlens hook name, aliases allowed), `hook_name_out` for a transcoder, `model_name`, ..."""

    architecture: str
    d_in: int
    d_sae: int
    d_out: int | None = None  # a transcoder's output width; an SAE writes back d_in
    k: int | None = None  # topk and batchtopk
    rescale_acts_by_decoder_norm: bool = False  # topk
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    reshape_activations: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.architecture not in ARCHITECTURES:
            problems.append(f"unknown architecture {self.architecture!r}; known: {', '.join(ARCHITECTURES)}")
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if self.architecture in ("topk", "batchtopk") and (not isinstance(self.k, int) or not 0 < self.k <= self.d_sae):
            problems.append(f"a {self.architecture} SAE needs k, an integer in 1..d_sae={self.d_sae}, got {self.k!r}")
        if self.is_transcoder and self.apply_b_dec_to_input:
            problems.append("a transcoder's b_dec has the output's width, so apply_b_dec_to_input must be False")
        if self.normalize_activations not in NORMALIZATIONS:
            problems.append(f"normalize_activations must be one of {NORMALIZATIONS}, got {self.normalize_activations!r}")
        if self.reshape_activations not in RESHAPES:
            problems.append(f"reshape_activations must be one of {RESHAPES}, got {self.reshape_activations!r}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if problems:
            raise ModelLoadError("SAE config: " + "; ".join(problems))
        if self.d_out is None:
            self.d_out = self.d_in

    @property
    def is_transcoder(self) -> bool:
        return self.architecture in TRANSCODERS

    @property
    def has_skip(self) -> bool:
        return self.architecture in SKIP_TRANSCODERS

    @property
    def hook_name(self) -> str | None:
        return self.metadata.get("hook_name")

    @property
    def hook_name_out(self) -> str | None:
        """Where a transcoder writes; an SAE writes where it reads."""
        return self.metadata.get("hook_name_out") if self.is_transcoder else self.hook_name

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_sae_lens_dict(self) -> dict[str, Any]:
        """The dict SAELens 6 writes to cfg.json (a BatchTopK as the JumpReLU it runs as)."""
        saved: dict[str, Any] = {
            "d_in": self.d_in, "d_sae": self.d_sae, "dtype": self.dtype, "device": self.device,
            "apply_b_dec_to_input": self.apply_b_dec_to_input, "normalize_activations": self.normalize_activations,
            "reshape_activations": self.reshape_activations, "metadata": dict(self.metadata),
            "architecture": self.architecture,
        }
        # SAELens reads a config that names no version of 6 or later as the flat pre-6 layout (and
        # drops the metadata), so the layout's version is written when the SAE came from elsewhere
        saved["metadata"].setdefault("sae_lens_version", SAE_LENS_FORMAT)
        if self.architecture == "topk":
            saved |= {"k": self.k, "rescale_acts_by_decoder_norm": self.rescale_acts_by_decoder_norm}
        if self.architecture == "batchtopk":
            saved["architecture"] = "jumprelu"
            saved["metadata"] |= {TRAINED_AS: "batchtopk", "k": self.k}
        if self.is_transcoder:
            saved["d_out"] = self.d_out
        return saved

    @classmethod
    def from_sae_lens_dict(cls, saved: dict[str, Any]) -> "SAEConfig":
        """Read a cfg.json of any SAELens version."""
        version = saved.get("sae_lens_version") or (saved.get("metadata") or {}).get("sae_lens_version")
        if "metadata" not in saved or (version and _major(version) < 6):
            saved = _from_pre_6(saved)
        metadata = dict(saved.get("metadata") or {})
        known = {f.name for f in fields(cls)} - {"metadata"}
        values = {key: saved[key] for key in known if key in saved}
        values["dtype"] = str(values.get("dtype", "float32")).removeprefix("torch.")
        if isinstance(values.get("k"), float) and values["k"].is_integer():  # a BatchTopK's k is a float in SAELens
            values["k"] = int(values["k"])
        if metadata.get(TRAINED_AS) == "batchtopk" and values.get("architecture") == "jumprelu":
            del metadata[TRAINED_AS]
            values["architecture"], values["k"] = "batchtopk", metadata.pop("k", None)
        if "architecture" not in values:
            raise ModelLoadError(f"cfg.json has no 'architecture'; known ones: {', '.join(ARCHITECTURES)}")
        return cls(**values, metadata=metadata)


# the keys SAELens keeps in metadata when it converts an old config (LLM_METADATA_KEYS)
_METADATA_KEYS = ("model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
                  "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice",
                  "dataset_path", "sae_lens_version", "sae_lens_training_version", "hook_name_out", "hook_head_index_out")


def _from_pre_6(saved: dict[str, Any]) -> dict[str, Any]:
    renamed = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}
    new = {renamed.get(key, key): value for key, value in saved.items()}
    new.setdefault("apply_b_dec_to_input", True)
    new.setdefault("architecture", "standard")
    new.setdefault("reshape_activations", "hook_z" if "hook_z" in (new.get("hook_name") or "") else "none")
    k = (new.get("activation_fn_kwargs") or {}).get("k")
    if new.get("activation_fn") == "topk" and k is not None:
        new["architecture"], new["k"] = "topk", k
    if isinstance(new.get("normalize_activations"), bool):
        new["normalize_activations"] = "expected_average_only_in" if new["normalize_activations"] else "none"
    if new.get("normalize_activations") is None:
        new["normalize_activations"] = "none"
    new["metadata"] = {key: new[key] for key in _METADATA_KEYS if key in new}
    return new


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0
