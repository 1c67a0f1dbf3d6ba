"""Hook points whose hooks must give back what they were given: same shape, dtype and device.

A TransformerLens hook may return a replacement activation. PyTorch broadcasts a tensor of a
smaller shape into the sums that follow (a hook returning batch row 0 gives every image row 0's
logits) and promotes a wider dtype, so a wrong return is a silently wrong result. Every forward
hook added to a `CheckedHookPoint` is wrapped so its return value is compared with its input
(three attribute comparisons per call) and a mismatch is an error naming the point and the hook.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from torch import Tensor
from transformer_lens.hook_points import HookPoint

from ..errors import HookReturnError


def hook_function_name(hook: Callable) -> str:
    """A readable name for a hook function without calling `repr` on a partial's arguments
    (which may hold whole activation caches)."""
    function = hook.func if isinstance(hook, partial) else hook
    return getattr(function, "__qualname__", None) or type(function).__name__


class ShapeKeepingHook:
    """A forward hook that refuses to return a tensor unlike the one it received."""

    __slots__ = ("hook",)

    def __init__(self, hook: Callable):
        self.hook = hook

    def __call__(self, activation: Any, hook: Any) -> Any:
        returned = self.hook(activation, hook=hook)
        if returned is None or returned is activation or not isinstance(activation, Tensor):
            return returned
        if not isinstance(returned, Tensor):
            raise HookReturnError(
                f"hook {hook_function_name(self.hook)} at {hook.name} returned a {type(returned).__name__}; a hook "
                f"returns None (to leave the activation as it is) or a tensor of shape {tuple(activation.shape)}"
            )
        if returned.shape != activation.shape or returned.dtype != activation.dtype or returned.device != activation.device:
            raise HookReturnError(
                f"hook {hook_function_name(self.hook)} at {hook.name} received {_described(activation)} but returned "
                f"{_described(returned)}; PyTorch would broadcast or convert it silently and the rest of the forward "
                "would be wrong. Return a tensor like the one received (edit a slice of a clone: "
                "`x = x.clone(); x[:, :1] = ...; return x`), or None to leave it unchanged"
            )
        return returned

    def __repr__(self) -> str:
        return hook_function_name(self.hook)


def _described(tensor: Tensor) -> str:
    return f"shape {tuple(tensor.shape)}, {tensor.dtype}, on {tensor.device}"


class CheckedHookPoint(HookPoint):
    """A TransformerLens `HookPoint` whose forward hooks are `ShapeKeepingHook`s."""

    def add_hook(self, hook: Callable, dir: str = "fwd", *args: Any, **kwargs: Any):
        if dir == "fwd" and not isinstance(hook, ShapeKeepingHook):
            hook = ShapeKeepingHook(hook)
        return super().add_hook(hook, dir, *args, **kwargs)
