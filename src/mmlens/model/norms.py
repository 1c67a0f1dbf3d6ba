"""Norm layers with TransformerLens's `hook_scale` and `hook_normalized`, whatever the family.

The Hugging Face norm runs as is; when a hook listens, its scale (`sqrt(mean(x^2) + eps)` for
RMSNorm, `sqrt(var(x) + eps)` for LayerNorm) is computed beside it and fired at `hook_scale`, and
HF's own output is rescaled by the scale `s'` the point gives back (`(out - b) * s / s' + b`): an
edit there moves the output, a backward hook there receives the loss's gradient, the norm's formula
(a plain weight, Gemma's `1 + weight` ...) never has to be restated, and an untouched scale (a
ratio of exactly 1) leaves the output bit-identical. `hook_normalized` is HF's output, weight
applied (TL fires it before the weight; docs/tl_compat.md says so). A norm's `w` is the factor it
applies (`1 + weight` for Gemma's).
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from .devices import bare_forward, override_forward
from .hook_tree import fire, is_hooked

NormKind = Literal["LN", "RMS"]
_INSTRUMENTED = "_mmlens_instrumented"


def norm_epsilon(module: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    raise AttributeError(f"{type(module).__name__} keeps its epsilon under no known name (variance_epsilon, eps)")


def norm_scale(x: Float[Tensor, "... d"], kind: NormKind, eps: float) -> Float[Tensor, "... 1"]:
    """The divisor a norm applies at each position, computed in float32 as HF norms do."""
    x = x.float()
    if kind == "LN":
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def instrument_norm(module: nn.Module, hooks: nn.Module, kind: NormKind) -> None:
    """Fire `hooks.hook_scale` and `hooks.hook_normalized` around a Hugging Face norm module."""
    original = bare_forward(module)
    eps = norm_epsilon(module)

    def forward(x: Tensor) -> Tensor:
        out = original(x)
        if not hooks.any_hooked():
            return out
        if is_hooked(hooks.hook_scale):
            scale = norm_scale(x, kind, eps).to(x.dtype)
            # the output always divides by the fired scale, edited or not, so its gradient (and a
            # backward hook there) is the loss's; a clone of its own keeps `scale`'s path apart
            used = hooks.hook_scale(scale.clone())
            # the bias read now, not when instrumented: accelerate swaps an offloaded module's
            # parameters in for the call and out again after it
            out = rescaled(out, (scale.float() / used.float()).to(out.dtype), getattr(module, "bias", None))
        return fire(hooks.hook_normalized, out)

    override_forward(module, forward)
    setattr(module, _INSTRUMENTED, True)
    hooks.bind_norm(module, kind, weight_offset(original, module, kind))


def rescaled(out: Tensor, ratio: Tensor, bias: Tensor | None) -> Tensor:
    """A norm's output `w * x / s + b` as if divided by `s' = s / ratio` instead of `s`. An unedited
    scale gives a ratio of exactly 1: both terms are then exact (`out * 1`, `b * 0`), so the
    output stays bit-identical, an overflowed `inf` included."""
    return out * ratio if bias is None else out * ratio + bias * (1 - ratio)


@torch.no_grad()
def weight_offset(forward, module: nn.Module, kind: NormKind) -> float:
    """1.0 for an RMSNorm that scales by `1 + weight` (Gemma's), else 0.0 (TL's
    `rmsnorm_uses_offset`), read from what `forward` computes on a vector of ones."""
    weight = getattr(module, "weight", None)
    if kind != "RMS" or not isinstance(weight, Tensor) or weight.ndim != 1 or weight.is_meta:
        return 0.0
    out = forward(torch.ones_like(weight)).float() * (1 + norm_epsilon(module)) ** 0.5
    return 1.0 if (out - weight.float() - 1).abs().max() < (out - weight.float()).abs().max() else 0.0
