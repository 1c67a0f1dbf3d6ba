"""Norm layers with TransformerLens's `hook_scale` and `hook_normalized`, whatever the family.

The Hugging Face norm runs as is; when a hook listens, its scale (`sqrt(mean(x^2) + eps)` for
RMSNorm, `sqrt(var(x) + eps)` for LayerNorm) is computed beside it and fired at `hook_scale`, and
HF's own output is rescaled by the scale `s'` the point gives back (`(out - b) * s / s' + b`): an
edit there moves the output, a backward hook there receives the loss's gradient, the norm's formula
(a plain weight, Gemma's `1 + weight` ...) never has to be restated, and an untouched scale (a
ratio of exactly 1) leaves the output bit-identical. A norm's `w` is the factor it applies
(`1 + weight` for Gemma's). `hook_normalized` holds what the weights exposed as reading it read:
a block's norm's output, weight applied (`W_Q`, `W_in` are unfolded), and for the LLM's final norm
(`FinalNormHooks`) the normalised residual before the weight, which `W_U` carries (TL's `fold_ln`).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from accelerate.utils import align_module_device
from jaxtyping import Float
from torch import Tensor, nn

from ..hook_tree import NormHooks, fire, is_hooked, untouched, version_of
from .devices import bare_forward, override_forward

NormKind = Literal["LN", "RMS"]
_INSTRUMENTED = "_mmlens_instrumented"


class FinalNormHooks(NormHooks):
    """The LLM's final norm as TL's `fold_ln` leaves it: `hook_normalized`, and calling it, give the
    normalised residual without the weight `w` (and bias `b`), which `model.W_U` / `model.b_U` carry."""

    _normalize: Callable[[Tensor], Tensor] | None = None

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        if self._normalize is None:
            raise AttributeError("this final norm has no Hugging Face module bound to it")
        return self._normalize(x)


def norm_epsilon(module: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    raise AttributeError(f"{type(module).__name__} keeps its epsilon under no known name (variance_epsilon, eps)")


def norm_scale(x: Float[Tensor, "... d"], kind: NormKind, eps: float) -> Float[Tensor, "... 1"]:
    """The divisor a norm applies at each position, computed in float32 as HF norms do."""
    return (_centred(x, kind).pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _centred(x: Tensor, kind: NormKind) -> Tensor:
    x = x.float()
    return x - x.mean(-1, keepdim=True) if kind == "LN" else x


def instrument_norm(module: nn.Module, hooks: nn.Module, kind: NormKind) -> None:
    """Fire `hooks.hook_scale` and `hooks.hook_normalized` around a Hugging Face norm module."""
    original = bare_forward(module)
    eps = norm_epsilon(module)
    offset = weight_offset(original, module, kind)

    def fired_scale(x: Tensor) -> tuple[Tensor, Tensor, bool] | None:
        """(scale, the scale `hook_scale` gave back, whether its hooks only read it), or None when
        nothing listens there."""
        if not is_hooked(hooks.hook_scale):
            return None
        scale = norm_scale(x, kind, eps).to(x.dtype)
        # a clone of its own keeps `scale`'s path apart from what the hooks do to theirs, and lets an
        # edit no version counter sees (through `.data`) show as a changed value
        sent = scale.clone()
        version = version_of(sent)
        used = hooks.hook_scale(sent)
        return scale, used, untouched(sent, used, version) and torch.equal(sent, scale)

    def scaled_output(x: Tensor) -> tuple[Tensor, Tensor | None]:
        """HF's output divided by the fired scale, and that scale (None: not fired)."""
        out = original(x)
        scales = fired_scale(x)
        if scales is None:
            return out, None
        scale, used, only_read = scales
        # the division by an unedited scale (a ratio of exactly 1) changes no bit; it is kept where
        # a gradient flows, so that the gradient reaching the point (and a backward hook there) is the loss's
        if only_read and not (torch.is_grad_enabled() and (x.requires_grad or used.requires_grad)):
            return out, used
        # the bias read now, not when instrumented: accelerate swaps an offloaded module's
        # parameters in for the call and out again after it
        return rescaled(out, (scale.float() / used.float()).to(out.dtype), getattr(module, "bias", None)), used

    def normalized(x: Tensor, used: Tensor | None) -> Tensor:
        """The normalised input before the weight, divided by the fired scale when there is one."""
        divisor = norm_scale(x, kind, eps) if used is None else used.float()
        return (_centred(x, kind) / divisor).to(x.dtype)

    def forward(x: Tensor) -> Tensor:
        if not hooks.any_hooked():
            return original(x)
        out, _ = scaled_output(x)
        return fire(hooks.hook_normalized, out)

    def forward_before_weight(x: Tensor) -> Tensor:
        if not hooks.any_hooked():
            return original(x)
        out, used = scaled_output(x)
        if not is_hooked(hooks.hook_normalized):
            return out
        before = normalized(x, used)
        # HF's output plus the weighted edit: exactly `out` when nothing is edited (a difference of
        # exactly 0), and the two paths through `before` cancel in the backward pass, so the input's
        # gradient stays HF's while a backward hook here receives `w` times the output's gradient
        edited = hooks.hook_normalized(before.clone())
        return out + ((edited - before).float() * factor()).to(out.dtype)

    def factor() -> Tensor | float:
        """The weight `w` in float32 as HF's norms apply it (`1 + weight` for Gemma's)."""
        weight = getattr(module, "weight", None)
        return 1.0 if weight is None else weight.float() + offset

    def call_before_weight(x: Tensor) -> Tensor:
        scales = fired_scale(x)
        return fire(hooks.hook_normalized, normalized(x, None if scales is None else scales[1]))

    before_weight = isinstance(hooks, FinalNormHooks)
    override_forward(module, forward_before_weight if before_weight else forward)
    setattr(module, _INSTRUMENTED, True)
    hooks.bind_norm(module, kind, offset)
    if before_weight:
        hooks._normalize = call_before_weight


def rescaled(out: Tensor, ratio: Tensor, bias: Tensor | None) -> Tensor:
    """A norm's output `w * x / s + b` as if divided by `s' = s / ratio` instead of `s`. An unedited
    scale gives a ratio of exactly 1: both terms are then exact (`out * 1`, `b * 0`), so the
    output stays bit-identical, an overflowed `inf` included."""
    return out * ratio if bias is None else out * ratio + bias * (1 - ratio)


@torch.no_grad()
def weight_offset(forward, module: nn.Module, kind: NormKind) -> float:
    """1.0 for an RMSNorm that scales by `1 + weight` (Gemma's), else 0.0 (TL's
    `rmsnorm_uses_offset`), read from what `forward` computes on a vector of ones. An offloaded
    norm (device_map) is read while accelerate holds its weight, which is `meta` otherwise."""
    if kind != "RMS":
        return 0.0
    with align_module_device(module):
        weight = getattr(module, "weight", None)  # held here: the forward's own hook offloads it again
        if not isinstance(weight, Tensor) or weight.ndim != 1 or weight.is_meta:
            return 0.0
        out = forward(torch.ones_like(weight)).float() * (1 + norm_epsilon(module)) ** 0.5
    return 1.0 if (out - weight.float() - 1).abs().max() < (out - weight.float()).abs().max() else 0.0
