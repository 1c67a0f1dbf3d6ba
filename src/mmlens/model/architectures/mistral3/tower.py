"""Hooks for Mistral 3's Pixtral vision tower and its projector (RMSNorm, 2x2 patch merger, MLP).

The tower convolves each image into patches, crops them to the image's own size, and packs every
image of the batch, each in raster order, into one sequence `[1, n_patches, d]`: `ln_pre`, then
pre-norm RMSNorm/SwiGLU blocks with a 2-D rotary embedding whose cos/sin tables are per packed
position (`[n_patches, d_head]`, hence `unsqueeze_dim=0`) and a block-diagonal additive mask
(one block per image) that Hugging Face passes to every layer. The blocks are therefore ordinary
pre-norm blocks for `instrument_block`: the hooked attention adds that same mask, so its scores
between two images are at the dtype's minimum and its pattern there exactly zero. There is no
norm after the last block. The projector's RMSNorm is `vision.ln_post`; `adapter.hook_in` is each
2x2 group concatenated as the merger's `unfold` lays it out (`[1, n_tokens, 4 d]`, channel-major),
`hook_hidden` the MLP's hidden layer after the merging linear, and `hook_out` what the LLM gets.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ...hook_tree import AdapterHooks, NormHooks, fire, is_hooked
from ...runtime.devices import bare_forward
from ...runtime.instrument import AttentionSpec, BlockSpec, _override_forward
from ...runtime.norms import instrument_norm

PIXTRAL_BLOCK = BlockSpec(
    ln1="attention_norm",
    attn="attention",
    ln2="ffn_norm",
    mlp="feed_forward",
    gated_mlp=True,
    attention=AttentionSpec(rotary=True, rotary_unsqueeze_dim=0),
)


def hook_packed_embeddings(ln_pre: nn.Module, point: Any) -> torch.utils.hooks.RemovableHandle:
    """`vision.hook_embed`: the packed patch embeddings `[1, n_patches, d]` as `ln_pre` receives them."""

    def pre_hook(_module: nn.Module, args: tuple):
        if not is_hooked(point):
            return None
        return (fire(point, args[0]), *args[1:])

    return ln_pre.register_forward_pre_hook(pre_hook)


def merge_groups(
    features: Float[Tensor, "n_patches d"], patch_grids: list[tuple[int, int]], merge: int
) -> Float[Tensor, "n_tokens merged"]:
    """Each image's `merge x merge` patch groups as rows (Hugging Face's `Mistral3PatchMerger`
    before its linear: `unfold` per image, groups in raster order, channel-major within a group)."""
    d = features.shape[-1]
    groups = []
    for (h, w), patches in zip(patch_grids, features.split([h * w for h, w in patch_grids])):
        grid = patches.view(h, w, d).permute(2, 0, 1).unsqueeze(0)
        unfolded = nn.functional.unfold(grid, kernel_size=merge, stride=merge)
        groups.append(unfolded.view(d * merge**2, -1).t())
    return torch.cat(groups, dim=0)


def instrument_projector(projector: nn.Module, ln_post: NormHooks, adapter: AdapterHooks, norm: str) -> None:
    """Hugging Face's projector while nothing listens; else norm (`vision.ln_post`), merge groups
    (`adapter.hook_in`), merging linear, MLP (`hook_hidden`, `hook_out`), with a leading dim of one."""
    instrument_norm(projector.norm, ln_post, norm)
    merger = projector.patch_merger
    original = bare_forward(projector)

    def forward(image_features: Tensor, image_sizes: Int[Tensor, "n_images 2"]) -> Tensor:
        if not (ln_post.any_hooked() or adapter.any_hooked()):
            return original(image_features, image_sizes)
        normed = projector.norm(image_features[None])[0]
        grids = [(int(h) // merger.patch_size, int(w) // merger.patch_size) for h, w in image_sizes]
        grouped = fire(adapter.hook_in, merge_groups(normed, grids, merger.spatial_merge_size)[None])
        merged = merger.merging_layer(grouped)
        hidden = fire(adapter.hook_hidden, projector.act(projector.linear_1(merged)))
        return fire(adapter.hook_out, projector.linear_2(hidden))[0]

    _override_forward(projector, forward)
