"""A linear probe: standardise with training statistics, then an affine map to class logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor


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
