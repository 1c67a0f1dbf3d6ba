"""Caching hooks that store each activation as it is, for the caching runs that ask for nothing more.

TransformerLens's caching hook can move, slice by position and drop the batch dimension of what
it stores, and reads the point's name five times per call to find the position dimension. A run
that asks for none of that stores the detached activation, which is exactly what TransformerLens's
hook stores then, in about a third of the time per point: a few percent of a small model's forward
when each of its few hundred points caches (`benchmarks/overhead.py`, cache every hook).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from transformer_lens.hook_points import HookPoint


def names_predicate(names_filter: Any) -> Callable[[str], bool]:
    """TransformerLens's `names_filter` forms as one predicate: None (every point), a name, a list of
    names, or a predicate."""
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if isinstance(names_filter, list):
        return lambda name: name in names_filter
    if callable(names_filter):
        return names_filter
    raise ValueError("names_filter must be a string, list of strings, or function")


def plain_caching_hooks(
    hook_names: list[str], names_filter: Any, cache: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], list[tuple[str, Callable]], list]:
    """`(cache, forward hooks, no backward hooks)` as TransformerLens's `get_caching_hooks` returns
    them with no device, position slice, batch-dimension drop or gradients asked for: each hook
    stores its point's activation, detached, under the point's name."""
    cache = {} if cache is None else cache

    def save_activation(tensor: Tensor, hook: HookPoint) -> None:
        cache[hook.name] = tensor.detach()

    wanted = names_predicate(names_filter)
    return cache, [(name, save_activation) for name in hook_names if wanted(name)], []
