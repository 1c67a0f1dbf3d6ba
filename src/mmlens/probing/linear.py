"""A linear probe: standardise with training statistics, then an affine map to class logits."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import InputError

PROBE_FIELDS = ("mean", "scale", "weight", "bias")
PROBE_FORMAT = "mmlens.LinearProbe"
SPARSE_PROBE_FORMAT = "mmlens.SparseLinearProbe"  # written by probing.sparse.SparseLinearProbe.save


def probe_file_header(path: Path, fields: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """(metadata, the names of `fields` it lacks) of a probe file written by `save`, read without
    loading its tensors; a path that is no file is refused."""
    if not path.is_file():
        raise InputError(f"no probe file at {path}; save one with probe.save(path)")
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}, [name for name in fields if name not in handle.keys()]


@dataclass
class LinearProbe:
    """`logits = ((x - mean) / scale) @ weight + bias`; fitted by ridge or logistic regression."""

    mean: Float[Tensor, "d"]
    scale: Float[Tensor, "d"]
    weight: Float[Tensor, "d n_classes"]
    bias: Float[Tensor, "n_classes"]
    kind: str = "linear"

    def __post_init__(self) -> None:
        # One memory layout whatever produced the tensors (LAPACK returns column-major solutions,
        # safetensors restores row-major): MKL rounds a float32 matmul differently by operand
        # layout, so a probe read back from disk must be laid out like the one fitted in memory.
        for name in ("mean", "scale", "weight", "bias"):
            setattr(self, name, getattr(self, name).contiguous())

    @property
    def n_classes(self) -> int:
        return self.weight.shape[1]

    def to(self, device: torch.device | str) -> "LinearProbe":
        return LinearProbe(*(t.to(device) for t in (self.mean, self.scale, self.weight, self.bias)), kind=self.kind)

    def logits(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n n_classes"]:
        z = (x.to(self.weight.dtype) - self.mean) / self.scale
        return z @ self.weight + self.bias

    def predict(self, x: Float[Tensor, "n d"]) -> Int[Tensor, "n"]:
        return self.logits(x).argmax(-1)

    def state_dict(self) -> dict[str, Tensor | str]:
        return {"mean": self.mean, "scale": self.scale, "weight": self.weight, "bias": self.bias, "kind": self.kind}

    def save(self, path: str | os.PathLike) -> Path:
        """Write this probe to one safetensors file (parent folders are created); `LinearProbe.load`
        reads it back, bit for bit."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in PROBE_FIELDS}
        save_file(tensors, str(path), metadata={"kind": self.kind, "format": PROBE_FORMAT})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "LinearProbe":
        """The probe `save` wrote at `path`."""
        path = Path(path)
        metadata, missing = probe_file_header(path, PROBE_FIELDS)
        if metadata.get("format") == SPARSE_PROBE_FORMAT and cls is LinearProbe:
            raise InputError(f"{path} holds a sparse probe (its chosen dimensions and SAE): read it with "
                             "mmlens.probing.sparse.SparseLinearProbe.load")
        if metadata.get("format") != PROBE_FORMAT or missing:
            raise InputError(f"{path} is not a probe saved by mmlens (missing {missing or 'its format tag'})")
        tensors = load_file(str(path), device=str(device))
        return cls(*(tensors[name] for name in PROBE_FIELDS), kind=metadata.get("kind", "linear"))
