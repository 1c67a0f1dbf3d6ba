"""Hook points whose hooks must give back what they were given: same shape, dtype and device.

A TransformerLens hook may return a replacement activation. PyTorch broadcasts a tensor of a
smaller shape into the sums that follow (a hook returning batch row 0 gives every image row 0's
logits) and promotes a wider dtype, so a wrong return is a silently wrong result. Every hook added
to a `CheckedHookPoint` is wrapped so its return value is compared with its input (three attribute
comparisons per call) and a mismatch is an error naming the point and the hook. Backward hooks are
checked the same way: PyTorch refuses a replacement gradient of another shape or dtype too, but
mid-backward and without naming the point or the hook.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from torch import Tensor
from transformer_lens.hook_points import HookPoint

from ..errors import HookReturnError
from .hook_names import parse_hook_name


def hook_function_name(hook: Callable) -> str:
    """A readable name for a hook function without calling `repr` on a partial's arguments
    (which may hold whole activation caches)."""
    function = hook.func if isinstance(hook, partial) else hook
    return getattr(function, "__qualname__", None) or type(function).__name__


class ShapeKeepingHook:
    """A forward hook (or, `backward`, a backward hook) that refuses to return a tensor unlike the
    activation (gradient) it received."""

    __slots__ = ("hook", "backward")

    def __init__(self, hook: Callable, backward: bool = False):
        self.hook = hook
        self.backward = backward

    def __call__(self, activation: Any, hook: Any) -> Any:
        returned = self.hook(activation, hook=hook)
        if self.backward and isinstance(returned, tuple) and len(returned) == 1:
            returned = returned[0]  # TransformerLens also takes a backward hook's `(grad,)`
        if returned is None or returned is activation or not isinstance(activation, Tensor):
            return returned
        received, kind = ("gradient", "backward hook") if self.backward else ("activation", "hook")
        if not isinstance(returned, Tensor):
            raise HookReturnError(
                f"{kind} {hook_function_name(self.hook)} at {hook.name} returned a {type(returned).__name__}; a hook "
                f"returns None (to leave the {received} as it is) or a tensor of shape {tuple(activation.shape)}"
            )
        if returned.shape != activation.shape or returned.dtype != activation.dtype or returned.device != activation.device:
            consequence = (
                "PyTorch would stop the backward pass there without naming the point" if self.backward
                else "PyTorch would broadcast or convert it silently and the rest of the forward would be wrong"
            )
            what = "a gradient of " if self.backward else ""
            raise HookReturnError(
                f"{kind} {hook_function_name(self.hook)} at {hook.name} received {what}{_described(activation)} but "
                f"returned {_described(returned)}; {consequence}. Return a tensor like the one received (edit a "
                "slice of a clone: `x = x.clone(); x[:, :1] = ...; return x`), or None to leave it unchanged"
            )
        return returned

    def __repr__(self) -> str:
        return hook_function_name(self.hook)


def _described(tensor: Tensor) -> str:
    return f"shape {tuple(tensor.shape)}, {tensor.dtype}, on {tensor.device}"


class CheckedHookPoint(HookPoint):
    """A TransformerLens `HookPoint` whose forward and backward hooks are `ShapeKeepingHook`s."""

    def add_hook(self, hook: Callable, dir: str = "fwd", *args: Any, **kwargs: Any):
        if dir in ("fwd", "bwd") and not isinstance(hook, ShapeKeepingHook):
            hook = ShapeKeepingHook(hook, backward=dir == "bwd")
        return super().add_hook(hook, dir, *args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        # TL reassigns these plain lists at every hook removal; nn.Module.__setattr__'s parameter
        # and submodule checks on them were a visible share of a small model's hooked forward
        if name in ("fwd_hooks", "bwd_hooks"):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def layer(self) -> int:
        """The index of the block this point sits in, within its stage: 3 for `blocks.3.attn.hook_z`
        and for `vision.blocks.3.attn.hook_z` (TL's `HookPoint.layer` reads `blocks.{l}` only, so
        a name filter matching both stages would fail on the tower's names)."""
        layer = parse_hook_name(self.name).layer if self.name else None
        if layer is not None:
            return layer
        raise ValueError(f"hook point {self.name!r} is in no block, so it has no layer; "
                         "hook.layer() applies to names under blocks.{l} or vision.blocks.{l}")
