"""Exact residual decompositions through what a block does to its sublayers' outputs.

A block adds `post(scale * y)` to its residual, where `y` is the attention output (head results
plus `b_O`) or the MLP output (neuron results plus `b_out`), `scale` a per-channel layer scale
(InternViT, DINOv2) and `post` a norm on the output (Gemma 3's sandwich norms). With the norm's
cached `hook_scale` s, `post(x) = w * centre(x) / s + b` is affine in x, so a head's or neuron's
share is its own result through the same linear map, and the constants (`b`, and the biases through
the map) make up the `bias` term: the components then sum to `attn_out` / `mlp_out` to float
rounding. Qwen3-VL's deepstack terms, added to the image tokens after the first LLM blocks, are
components of their own (`{i}_deepstack`), as is what Gemma 4's per-layer inputs add after each
block's MLP (`{l}_per_layer`, its `hook_per_layer_out`). A block that scales its whole output, residual included
(Gemma 4's `layer_scalar` s: `resid_post = s * (resid_mid + mlp_out)`), scales every term added
before it: a term enters block `layer` times the product of the scalars of the blocks it passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import einops
import torch
from torch import Tensor
from transformer_lens.utilities import Slice

from ..errors import HookNameError, UnsupportedModelError
from .weights import MoEWeights


@dataclass(frozen=True)
class OutputMap:
    """What a block does to one sublayer's output `y` before adding it to the residual:
    `gain * centre(layer_scale * y) / scale + shift` (each part absent where the block has none)."""

    layer_scale: Tensor | None
    gain: Tensor | None
    centred: bool
    shift: Tensor | None
    scale: Tensor | None  # the post-norm's cached hook_scale [*batch, pos, 1]

    def fixed(self, rows: Tensor) -> Tensor:
        """The position-independent linear part, on rows with d_model last."""
        if self.layer_scale is not None:
            rows = rows * self.layer_scale
        if self.centred:
            rows = rows - rows.mean(-1, keepdim=True)
        return rows if self.gain is None else rows * self.gain

    def divisor(self, pos_slice: Slice) -> Tensor | None:
        return None if self.scale is None else pos_slice.apply(self.scale, dim=-2)

    def heads(self, results: Tensor, pos_slice: Slice) -> Tensor:
        """Per-head results `[*batch, pos, head, d_model]` (pos already sliced) as residual shares."""
        mapped, divisor = self.fixed(results), self.divisor(pos_slice)
        return mapped if divisor is None else mapped / divisor[..., None, :]

    def constant(self, bias: Tensor, pos_slice: Slice) -> Tensor:
        """A bias's share of the residual (with the norm's own bias): `[d_model]`, or
        `[*batch, pos, d_model]` behind a post-norm."""
        mapped, divisor = self.fixed(bias), self.divisor(pos_slice)
        if divisor is not None:
            mapped = mapped / divisor
        return mapped if self.shift is None else mapped + self.shift


def output_map(cache: Any, layer: int, sublayer: int) -> OutputMap:
    """The map of block `layer`'s attention (`sublayer` 0) or MLP (1) output, read from the
    block and, for a post-norm, the cache (its `hook_scale` must be cached)."""
    block = cache.model.blocks[layer]
    layer_scale = block.layer_scale(sublayer) if hasattr(block, "layer_scale") else None
    norm = block.post_norm(sublayer) if hasattr(block, "post_norm") else None
    if norm is None:
        return OutputMap(layer_scale, None, False, None, None)
    name = f"blocks.{layer}.{('ln1_post', 'ln2_post')[sublayer]}.hook_scale"
    if name not in cache.cache_dict:
        raise HookNameError(f"decomposing through block {layer}'s post-norm needs its cached scale {name!r}; "
                            "include it in run_with_cache's names_filter (e.g. names ending in 'hook_scale')")
    shift = norm.b if norm.kind == "LN" else None
    return OutputMap(layer_scale, norm.w, norm.kind == "LN", shift, cache.cache_dict[name])


def carried(term: Tensor, cache: Any, first: int, layer: int) -> Tensor:
    """`term`, added to the residual inside block `first`, as it enters block `layer`: times the
    output scalars of blocks `first` .. `layer - 1` (none, for most families)."""
    for block in cache.model.blocks[max(first, 0):layer]:
        scalar = block.output_scalar() if hasattr(block, "output_scalar") else None
        if scalar is not None:
            term = term * scalar
    return term


def head_results(cache: Any, layer: int, pos_slice: Slice) -> Tensor:
    """Each head's share of the residual at block `layer`: `z W_O` per head (`hook_result` where
    cached, as the forward computed it) through the block's output map, `[*batch, pos, head, d_model]`."""
    name = f"blocks.{layer}.attn.hook_result"
    raw = cache.cache_dict.get(name)
    if raw is None or raw.shape[-2] != cache.model.cfg.n_heads:
        z, w_o = cache[f"blocks.{layer}.attn.hook_z"], cache.model.blocks[layer].attn.W_O
        dtype = torch.promote_types(z.dtype, w_o.dtype)
        raw = torch.einsum("...hd,hdm->...hm", z.to(dtype), w_o.to(dtype))
    return output_map(cache, layer, 0).heads(pos_slice.apply(raw, dim=-3), pos_slice)


def neuron_results(cache: Any, layer: int, neuron_slice: Slice, pos_slice: Slice,
                   project: Tensor | None = None) -> Tensor:
    """Each neuron's share of the residual at block `layer`, `[..., neuron, d_model]`, or projected
    onto `project` (`[d_model]` or `[d_model, k]`) before the expansion, as TL's `get_neuron_results`."""
    if isinstance(cache.model.blocks[layer].mlp, MoEWeights):
        raise UnsupportedModelError(
            f"block {layer}'s MLP is a mixture of experts: each expert has its own neurons, on the tokens it serves "
            f"(blocks.{layer}.mlp.experts.{{e}}.hook_post), so there is no single neuron basis to expand it into; use "
            f"expand_neurons=False (its mlp_out as one component), or the experts' blocks.{layer}.mlp.experts.{{e}}.hook_out, "
            "which sum to that mlp_out exactly")
    if "cross_attn" in cache.model.blocks[layer]._modules:
        raise UnsupportedModelError(
            f"block {layer} is a cross-attention block: its MLP's output is scaled by tanh of a learned gate and dropped "
            f"at text tokens that read no image tile (blocks.{layer}.hook_mlp_gate), which a neuron expansion through "
            "W_out does not carry; use expand_neurons=False (its mlp_out as one component)")
    acts = neuron_slice.apply(pos_slice.apply(cache[f"blocks.{layer}.mlp.hook_post"], dim=-2), dim=-1)
    mapping = output_map(cache, layer, 1)
    w_out = mapping.fixed(neuron_slice.apply(cache.model.blocks[layer].mlp.W_out, dim=0))
    divisor = mapping.divisor(pos_slice)
    if divisor is not None:
        acts = acts / divisor
    if project is None:
        return acts[..., None] * w_out
    projected = w_out @ project
    return acts * projected if project.ndim == 1 else acts[..., None] * projected


def bias_share(cache: Any, layer: int, mlp_input: bool, include_mlp_biases: bool, pos_slice: Slice) -> Tensor:
    """The biases' share of the residual entering block `layer` (its MLP with `mlp_input`): `b_O`
    and `b_out` of the blocks before, through their output maps, plus the post-norms' own biases."""
    blocks = cache.model.blocks
    total = torch.zeros_like(blocks[0].attn.b_O)
    for l in range(layer + (1 if mlp_input else 0)):
        share = output_map(cache, l, 0).constant(blocks[l].attn.b_O, pos_slice)
        if l < layer and include_mlp_biases:  # else they are inside the whole MLP outputs
            share = share + output_map(cache, l, 1).constant(blocks[l].mlp.b_out, pos_slice)
        total = total + carried(share, cache, l, layer)
    return total


def deepstack_terms(cache: Any, layer: int) -> list[tuple[str, Tensor]]:
    """Qwen3-VL's deepstack terms that reach the residual entering block `layer`, each scattered to
    the image tokens `[*batch, pos, d_model]` and labelled `{i}_deepstack`; none for other families."""
    levels = getattr(getattr(cache.model, "adapter", None), "deepstack", None)
    if levels is None:
        return []
    parent = cache._stage_of or cache
    layout = cache.layout
    terms = []
    for level in range(min(len(levels), layer)):
        name = f"adapter.deepstack.{level}.hook_out"
        if name not in parent.cache_dict:
            if layout is not None and layout.n_images == 0:
                continue  # text only: the LLM added nothing
            raise HookNameError(f"the residual after LLM block {level} includes the deepstack term {name!r}, which "
                                "this cache does not hold (or has no layout to place it by); include it in names_filter")
        term = parent.cache_dict[name]
        term = term[0] if cache.has_batch_dim else term
        residual = cache["blocks.0.hook_resid_pre"]
        image = layout.image_token_mask().to(residual.device)
        if not cache.has_batch_dim:
            image = image[0]
        if int(image.sum()) != term.shape[0]:
            raise HookNameError(f"{name} has {term.shape[0]} tokens but the layout has {int(image.sum())} image tokens")
        placed = torch.zeros_like(residual)
        placed[image] = term.to(residual.dtype)
        terms.append((f"{level}_deepstack", carried(placed, cache, level + 1, layer)))
    return terms


def per_layer_terms(cache: Any, layer: int) -> list[tuple[str, Tensor]]:
    """What Gemma 4's per-layer inputs add after the MLP of each block before `layer`
    (`blocks.{l}.hook_per_layer_out`), as it enters block `layer`, labelled `{l}_per_layer`; none
    for blocks without them."""
    return [(f"{l}_per_layer", carried(cache[f"blocks.{l}.hook_per_layer_out"], cache, l, layer))
            for l in range(layer) if hasattr(cache.model.blocks[l], "hook_per_layer_out")]


def residual_parts(cache: Any, layer: int, mlp_input: bool, mode: str, incl_embeds: bool) -> tuple[list[Tensor], list[str]]:
    """TL's `decompose_resid` components (embed, then each block's attn_out and mlp_out) with the
    deepstack terms after the MLP of the block that adds them (mode "all" only)."""
    parts, labels = [], []
    if incl_embeds and cache.has_embed:
        parts.append(carried(cache["hook_embed"], cache, 0, layer))
        labels.append("embed")
    terms = dict(deepstack_terms(cache, layer) + per_layer_terms(cache, layer)) if mode == "all" else {}
    for l in range(layer):
        if mode != "mlp":
            parts.append(carried(cache[f"blocks.{l}.hook_attn_out"], cache, l, layer))
            labels.append(f"{l}_attn_out")
        if mode != "attn" and not cache.model.cfg.attn_only:
            parts.append(carried(cache[f"blocks.{l}.hook_mlp_out"], cache, l, layer))
            labels.append(f"{l}_mlp_out")
        for label in (f"{l}_per_layer", f"{l}_deepstack"):
            if label in terms:
                parts.append(terms[label])
                labels.append(label)
    if mlp_input and mode != "mlp":
        parts.append(cache[f"blocks.{layer}.hook_attn_out"])
        labels.append(f"{layer}_attn_out")
    return parts, labels


def stack_heads(cache: Any, layer: int, pos_slice: Slice, into: int | None = None) -> tuple[Tensor, list[str]]:
    """Every head's share of the blocks before `layer`, `[layer * n_heads, *batch, pos, d_model]`, as
    it enters block `into` (default `layer`; the heads' own block for an MLP input)."""
    n_heads = cache.model.cfg.n_heads
    into = layer if into is None else into
    per_layer = [carried(head_results(cache, l, pos_slice), cache, l, into) for l in range(layer)]
    labels = [f"L{l}H{h}" for l in range(layer) for h in range(n_heads)]
    if not per_layer:
        empty = pos_slice.apply(cache["hook_embed"], dim=-2)
        return empty.new_zeros((0, *empty.shape)), labels
    stacked = einops.rearrange(torch.cat(per_layer, dim=-2), "... component d_model -> component ... d_model")
    return stacked, labels


def ln_projection(cache: Any, layer: int, mlp_input: bool, pos_slice: Slice, project: Tensor) -> tuple[Tensor, Tensor]:
    """`(P, s)` with `apply_ln_to_stack(x) @ project == (x @ P) / s` for the norm entering `layer`:
    the cached-scale norm is linear, so its centring and weight fold into the projection."""
    weight = cache._applied_norm_weight(layer, mlp_input)
    folded = project if weight is None else project * weight[:, None]
    if cache._uses_ln_centering(layer):
        folded = folded - folded.mean(0, keepdim=True)
    return folded, cache._get_cached_ln_scale(layer, mlp_input, pos_slice)


def full_decomposition(cache: Any, layer: int, mlp_input: bool, expand_neurons: bool, apply_ln: bool,
                       pos_slice: Slice, project: Tensor | None) -> tuple[Tensor, list[str]]:
    """TL's `get_full_resid_decomposition` (heads, neurons or MLP outputs, embed, bias), through the
    blocks' output maps and with the deepstack terms: components sum to the residual entering `layer`.
    `project` is `[d_model, k]`; with `apply_ln` it is folded into the norm as in `ln_projection`."""
    folded = ln_projection(cache, layer, mlp_input, pos_slice, project) if apply_ln and project is not None else None
    into = folded[0] if folded is not None else project

    def out(stack: Tensor) -> Tensor:
        if into is None:
            return stack
        return stack @ into if folded is None else (stack @ into) / folded[1]

    heads, labels = stack_heads(cache, layer + (1 if mlp_input else 0), pos_slice, into=layer)
    parts = [out(heads)]
    if not cache.model.cfg.attn_only and layer > 0:
        if expand_neurons:
            everything = Slice(None)
            per_layer = [carried(neuron_results(cache, l, everything, pos_slice, into), cache, l, layer)
                         for l in range(layer)]
            neurons = einops.rearrange(torch.cat(per_layer, dim=-2), "... component d -> component ... d")
            parts.append(neurons if folded is None else neurons / folded[1])
            # a block's own width: Gemma 4's KV-sharing blocks may have a double-wide MLP
            labels += [f"L{l}N{n}" for l in range(layer) for n in range(cache.model.blocks[l].mlp.W_out.shape[0])]
        else:
            mlp, mlp_labels = residual_parts(cache, layer, mlp_input, "mlp", incl_embeds=False)
            parts.append(out(torch.stack([pos_slice.apply(m, dim=-2) for m in mlp])))
            labels += mlp_labels
    whole = [("embed", carried(cache["hook_embed"], cache, 0, layer))] if cache.has_embed else []
    for label, term in whole + deepstack_terms(cache, layer) + per_layer_terms(cache, layer):
        parts.append(out(pos_slice.apply(term, dim=-2)[None]))
        labels.append(label)
    bias = bias_share(cache, layer, mlp_input, expand_neurons, pos_slice)
    parts.append(out(bias.expand(*heads.shape[1:-1], bias.shape[-1])[None]))
    labels.append("bias")
    stack = torch.cat(parts, dim=0)
    if apply_ln and project is None:
        stack = cache.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
    return stack, labels
