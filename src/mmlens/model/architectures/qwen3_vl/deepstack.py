"""Qwen3-VL's deepstack: vision features added to the LLM's residual after its first blocks, as hook points.

The tower takes its residual after each block in `deepstack_visual_indexes`; each goes through its
own 2x2 merger (LayerNorm after the grouping, then an MLP) to one vector per image token, and
Hugging Face's text model adds the i-th of them to the image tokens' residual right after decoder
layer i (`_deepstack_process`, between two layer calls). Here that addition moves into layer i
itself, after its MLP: `adapter.deepstack.{i}.hook_out` ([1, n_image_tokens, d_model], every image
of the batch in the LLM's token order, like `adapter.hook_out`) fires on the term just before it is
added, and `blocks.{i}.hook_resid_post` fires on the sum, so it is what block i + 1 reads
(`blocks.{i+1}.hook_resid_pre`). The addition is Hugging Face's own `_deepstack_process`, so a run
without hooks stays bit-identical. A hook that returns zeros removes that term (the model then
runs as Hugging Face would without it); a hook that returns another run's term patches it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from ...hook_tree import HookGroup, fire, is_hooked
from ...runtime.devices import bare_forward
from ...runtime.instrument import _override_forward
from ...runtime.layer_runs import silenced

# The keyword that carries the terms into the LLM on runs that start from the merged embeddings
# (no pixels reach Hugging Face's forward there); the LLM's pre-hook takes it out again.
DEEPSTACK = "mmlens_deepstack"


@dataclass(frozen=True)
class DeepstackTerms:
    """Where the terms go (the image tokens of each row) and, per deepstack level, the term of
    every image token of the batch in order."""

    image_mask: Bool[Tensor, "batch seq"]
    features: tuple[Float[Tensor, "n_image_tokens d_model"], ...]


class DeepstackHooks(HookGroup):
    def __init__(self):
        super().__init__("hook_out")


def image_features(hf_model: nn.Module, pixel_values: Tensor, grid_thw: Tensor, silent: Iterable[nn.Module]) -> tuple[Tensor, ...]:
    """The tower's deepstack features (one `[n_image_tokens, d_model]` per level) computed as
    Hugging Face's forward computes them, with the `silent` hook points quiet (a run from merged
    embeddings fires no vision or adapter hook)."""
    with silenced(*silent):
        out = hf_model.model.get_image_features(pixel_values, grid_thw)
    return tuple(torch.cat(level) for level in out.deepstack_features)


def instrument_deepstack(lm: nn.Module, layers: Any, root: Any, n_levels: int) -> list[torch.utils.hooks.RemovableHandle]:
    """Give `root.adapter` one `deepstack.{i}` group per level, move each level's addition into
    LLM layer i (see the module docstring) and take the terms out of the LLM's keywords."""
    root.adapter.deepstack = nn.ModuleList(DeepstackHooks() for _ in range(n_levels))
    state: dict[str, DeepstackTerms | None] = {"terms": None}

    def take_terms(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mask, features = kwargs.pop("visual_pos_masks", None), kwargs.pop("deepstack_visual_embeds", None)
        given = kwargs.pop(DEEPSTACK, None)
        state["terms"] = DeepstackTerms(mask, tuple(features)) if features is not None else given
        return args, kwargs

    for level in range(n_levels):
        _add_after_layer(lm, layers[level], level, root.adapter.deepstack[level].hook_out,
                         root.blocks[level].hook_resid_post, state)
    return [lm.register_forward_pre_hook(take_terms, with_kwargs=True)]


def _add_after_layer(lm: nn.Module, layer: nn.Module, level: int, term_point: nn.Module, resid_post: nn.Module,
                     state: dict) -> None:
    inner = bare_forward(layer)  # the block as instrumented (Hugging Face's code while nothing listens)

    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        terms = state["terms"]
        if terms is None:  # text only, or a cached decoding step
            return inner(hidden_states, *args, **kwargs)
        # a block of a growing batch (patching copies joining at their layer) computes the first
        # rows only: their image tokens come first in the terms, which follow the rows in order
        mask, features = terms.image_mask[:len(hidden_states)], terms.features[level]
        features = features[:int(mask.sum())]
        if not (is_hooked(term_point) or is_hooked(resid_post)):
            return lm._deepstack_process(inner(hidden_states, *args, **kwargs), mask, features)
        with silenced(resid_post):  # it fires below, on the sum
            out = inner(hidden_states, *args, **kwargs)
        term = fire(term_point, features[None])[0]
        return fire(resid_post, lm._deepstack_process(out, mask, term))

    _override_forward(layer, forward)
