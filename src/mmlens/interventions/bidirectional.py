"""Bidirectional image attention: the tokens of one image attend to each other both ways in the
chosen LLM layers, while everything else stays causal.

The causal mask is already added to the scores when `hook_attn_scores` fires, so the hook
recomputes the raw scores of the image-to-image entries from the rotated queries and keys of the
same layer (stashed by hooks on `hook_rot_q` / `hook_rot_k`; the keys of the block whose keys it reuses,
for Gemma 4's KV-sharing blocks) and puts them back. In every layer
this equals Hugging Face run with the 4D mask of `image_attention_mask`, which `effective_mask`
returns for inspection.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from jaxtyping import Bool
from torch import Tensor

from ..model import HookedMLLM, MultimodalInputs
from ..model.edits import HookSet
from ..model.hook_names import block_hook, parse_hook_name
from ..model.runtime.attention_masks import allowed_edges
from .selection import attention_layers


class BidirectionalImageAttention(HookSet):
    def __init__(self, model: HookedMLLM, inputs: MultimodalInputs, layers: Iterable[int] | None = None):
        if layers is None:  # the layers the family's own "bidirectional" opens (Gemma 4: its sliding ones)
            layers = model.architecture.image_attention_layers(model.cfg)
        self.layers = attention_layers(layers, model.cfg.llm, "a bidirectional image-attention edit")
        self.model, self.inputs = model, inputs
        image = inputs.layout.image_of_position()
        same_image = (image[:, :, None] == image[:, None, :]) & (image[:, :, None] >= 0)
        self.opened: Bool[Tensor, "batch query key"] = (same_image & ~torch.ones_like(same_image).tril()).to(model.cfg.device)
        self.scales = {l: model.architecture.llm_attention_scale(model.hf_model, l) for l in self.layers}
        self._stash: dict[str, Tensor] = {}
        # the queries and keys as scored: rotated, or as projected where positions are learned (OPT)
        rotary = model.cfg.llm.positional_embedding_type == "rotary"
        self._q, self._k = ("hook_rot_q", "hook_rot_k") if rotary else ("hook_q", "hook_k")
        self._key_layer = {l: model.architecture.key_value_layer(model.cfg, l) for l in self.layers}
        # the last edited layer reading each stashed key: it drops the key, so no run reads another's
        self._last_reader = {key: max(l for l in self.layers if self._key_layer[l] == key) for key in self._key_layer.values()}
        self.hooks = []
        for l in self.layers:
            self.hooks += [(block_hook(l, f"attn.{self._q}"), self._keep), (block_hook(l, "attn.hook_attn_scores"), self._open)]
        self.hooks += [(block_hook(l, f"attn.{self._k}"), self._keep) for l in sorted(set(self._key_layer.values()))]

    def effective_mask(self) -> Bool[Tensor, "batch query key"]:
        """True where a query may read a key in the edited layers (padding respected)."""
        return allowed_edges(self.inputs.layout.image_of_position(), self.inputs.attention_mask, True)

    def _keep(self, x: Tensor, hook) -> None:
        self._stash[hook.name] = x

    def _open(self, scores: Tensor, hook) -> Tensor:
        layer = parse_hook_name(hook.name).layer
        # [b, s, heads, d]; keys stay stashed for the later blocks that reuse them, until the last one
        q = self._stash.pop(block_hook(layer, f"attn.{self._q}"))
        key_layer = self._key_layer[layer]
        key_name = block_hook(key_layer, f"attn.{self._k}")
        k = self._stash.pop(key_name) if self._last_reader[key_layer] == layer else self._stash[key_name]
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        raw = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.scales[layer]
        return torch.where(self.opened[:, None], raw, scores)


def bidirectional_image_attention(model: HookedMLLM, inputs: MultimodalInputs,
                                  layers: Iterable[int] | None = None) -> BidirectionalImageAttention:
    """Image tokens of the same image see each other in `layers` (by default those where the family's
    "bidirectional" mode opens images: every LLM layer, or Gemma 4's sliding-window layers)."""
    return BidirectionalImageAttention(model, inputs, layers)
