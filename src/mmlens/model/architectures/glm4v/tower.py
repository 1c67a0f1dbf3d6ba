"""Hooks for GLM-4V's tower tail: the post-norm, the m x m downsampling convolution and the merger.

The blocks are Qwen2.5-VL's packed ones (RMSNorm, SwiGLU, fused qkv, 2-D rotary; `qwen2_vl/tower.py`
hooks them) without windows. After them the tower normalises the packed sequence (`post_layernorm`
= `vision.ln_post`), folds each token's m x m patches through a convolution of kernel and stride m
(a linear map of the m*m concatenated patches) and runs the merger (a linear, LayerNorm, GELU and a
SwiGLU MLP) on each folded token. The adapter is the convolution and the merger: `adapter.hook_in`
holds each token's m*m normalised patches concatenated in raster order (`[1, n_tokens, m*m*d]`, what
Qwen2-VL's merger reads too), `hook_hidden` the convolution's output (the merger's input, Hugging
Face's `last_hidden_state`) and `hook_out` what the LLM receives. Every point has a leading batch
dimension of one, like the packed blocks'.
"""

from __future__ import annotations

from torch import Tensor, nn

from ...hook_tree import AdapterHooks, NormHooks, fire, is_hooked
from ...runtime.devices import bare_forward
from ...runtime.instrument import _override_forward
from ...runtime.norms import instrument_norm


def instrument_downsampling_merger(visual: nn.Module, ln_post: NormHooks, adapter: AdapterHooks) -> None:
    """Hook `visual.post_layernorm`, `visual.downsample` and `visual.merger` (see the module's docstring);
    each runs Hugging Face's own code while its points are quiet."""
    norm, conv, merger = visual.post_layernorm, visual.downsample, visual.merger
    merge = visual.spatial_merge_size
    instrument_norm(norm, ln_post, "RMS")
    normalize, fold, project = bare_forward(norm), bare_forward(conv), bare_forward(merger)

    def packed_norm(x: Tensor) -> Tensor:  # the tower's [n_patches, d]; the points see [1, n_patches, d]
        return normalize(x[None])[0] if ln_post.any_hooked() else normalize(x)

    def downsample(x: Tensor) -> Tensor:  # [n_tokens, d, m, m]: each token's patches, channels first
        if not is_hooked(adapter.hook_in):
            return fold(x)
        n_tokens, d = x.shape[:2]
        grouped = fire(adapter.hook_in, x.permute(0, 2, 3, 1).reshape(1, n_tokens, merge * merge * d))
        return fold(grouped.reshape(n_tokens, merge, merge, d).permute(0, 3, 1, 2))

    def merged(x: Tensor) -> Tensor:  # [n_tokens, d_hidden], the folded tokens in the LLM's order
        if not (is_hooked(adapter.hook_hidden) or is_hooked(adapter.hook_out)):
            return project(x)
        return fire(adapter.hook_out, project(fire(adapter.hook_hidden, x[None])))[0]

    _override_forward(norm, packed_norm)
    _override_forward(conv, downsample)
    _override_forward(merger, merged)
