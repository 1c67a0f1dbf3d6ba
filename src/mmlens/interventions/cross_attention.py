"""Knockout of what text tokens read from the images through cross-attention (Mllama).

A cross-attending LLM has no image tokens to block edges to; its text tokens read the images as
keys and values of its cross-attention layers, under the family's own mask of which tiles each
text token may read. The knockout edits that mask for a token group and a choice of images and
tiles, so the knocked-out run is exactly the Hugging Face model run with the mask edited by hand;
`verify` measures the attention left on blocked keys in every cross-attention layer (zero, unless
a text token is left with no tile at all, where the model's own rule spreads its attention evenly
and drops its cross-attention MLP instead).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from jaxtyping import Bool
from torch import Tensor

from ..errors import UnsupportedModelError
from ..model.inputs import MultimodalInputs
from .groups import GroupContext, TokenGroup

if TYPE_CHECKING:
    from ..model.hooked_mllm import HookedMLLM


@dataclass(frozen=True)
class CrossAttentionKnockout:
    """The knocked-out inputs (run them, or patch from or into them as a `Run`), the text tokens cut
    off, and the attention left on blocked keys per cross-attention layer (after `verify`)."""

    inputs: MultimodalInputs
    queries: Bool[Tensor, "batch seq"]
    blocked_mass: dict[int, float]


def cross_attention_knockout(
    model: HookedMLLM, inputs: MultimodalInputs, queries: TokenGroup | Tensor | None = None,
    images: list[int] | None = None, tiles: list[int] | None = None, *, verify: bool = True,
    context: GroupContext | None = None,
) -> CrossAttentionKnockout:
    """Cut the text tokens `queries` (a TokenGroup or a [batch, seq] mask; default every text token)
    off from the tiles `tiles` of the images `images` (layout order; None: all) in every
    cross-attention layer."""
    block = getattr(model.architecture, "cross_attention_keys_blocked", None)
    cross = model.cfg.llm.cross_attention_layers
    if block is None or not cross:
        raise UnsupportedModelError(
            f"{model.cfg.architecture} has no cross-attention layers: its images are tokens of the LLM's sequence, so "
            "text -> image attention is knocked out with mmlens.interventions.knockout(queries=..., keys=TokenGroup.image())")
    if queries is None:
        queries = TokenGroup.text()
    chosen = queries.resolve(inputs, context) if isinstance(queries, TokenGroup) else queries.bool().cpu()
    edited = replace(inputs, extra=block(inputs.layout, dict(inputs.extra), chosen, images, tiles))
    mass: dict[int, float] = {}
    if verify:
        before = inputs.extra["cross_attention_mask"].bool().cpu()
        after = edited.extra["cross_attention_mask"].bool().cpu()
        cut = (before & ~after)  # [batch, seq, slot, tile] edges the edit closed
        still_reads = after.flatten(2).any(-1)  # tokens with a tile left: the others attend evenly by HF's rule
        names = [f"blocks.{layer}.cross_attn.hook_pattern" for layer in cross]
        _, cache = model.run_with_cache(edited, names_filter=names)
        for layer, name in zip(cross, names):
            pattern = cache[name].cpu()  # [batch, head, query, key]; keys slot-major, tile, then token
            per_tile = pattern.unflatten(-1, (*cut.shape[2:], -1)).sum(-1)
            closed = (cut & still_reads[..., None, None])[:, None]
            mass[layer] = float(per_tile[closed.expand_as(per_tile)].sum())
    return CrossAttentionKnockout(edited, chosen, mass)


def encoder_cross_attention_knockout(
    model: HookedMLLM, inputs: MultimodalInputs, keys: TokenGroup | Tensor | None = None, *, verify: bool = True,
    context: GroupContext | None = None,
) -> CrossAttentionKnockout:
    """Cut an encoder-decoder LLM's decoder (BLIP-2 with Flan-T5) off from the encoder positions `keys` (a
    TokenGroup or a [batch, seq] mask over the encoder's input; default every image's tokens) in every
    cross-attention layer: its cross-attention mask is edited, so the run is the Hugging Face decoder given
    that mask. Every decoder token is cut off (`queries` holds the keys cut, over the encoder's sequence);
    `verify` measures the attention left on them in each `decoder.blocks.{l}.cross_attn.hook_pattern`."""
    block = getattr(model.architecture, "encoder_keys_blocked", None)
    if block is None:
        raise UnsupportedModelError(
            f"{model.cfg.architecture} has no decoder reading an encoder: its images are tokens of the LLM's sequence "
            "(knock out text -> image attention with mmlens.interventions.knockout) or keys of its cross-attention "
            "layers (cross_attention_knockout)")
    if keys is None:
        chosen = (inputs.layout.image_of_position() >= 0).cpu()
    else:
        chosen = keys.resolve(inputs, context) if isinstance(keys, TokenGroup) else keys.bool().cpu()
    edited = replace(inputs, extra=block(dict(inputs.extra), inputs.attention_mask, chosen))
    mass: dict[int, float] = {}
    if verify:
        names = {}
        while (name := f"decoder.blocks.{len(names)}.cross_attn.hook_pattern") in model.hook_dict:
            names[len(names)] = name
        _, cache = model.run_with_cache(edited, names_filter=list(names.values()))
        for layer, name in names.items():
            pattern = cache[name].cpu()  # [batch, head, decoder position, encoder position]
            mass[layer] = float(pattern[chosen[:, None, None, :].expand_as(pattern)].sum())
    return CrossAttentionKnockout(edited, chosen, mass)


__all__ = ["CrossAttentionKnockout", "cross_attention_knockout", "encoder_cross_attention_knockout"]
