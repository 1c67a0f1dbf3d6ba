"""A tiny Qwen3-VL (Qwen2-VL's tower with deepstack, a Qwen3 LLM) and its processor (Qwen2-VL's)."""

from __future__ import annotations

from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from .common import instantiate, text_kwargs
from .qwen2_vl import qwen_processor


def tiny_qwen3_vl(
    *,
    patch_size: int = 4,
    vision_layers: int = 3,
    vision_d_model: int = 32,
    deepstack_layers: tuple[int, ...] = (0, 1),
    llm_layers: int = 3,
    llm_d_model: int = 64,
    llm_heads: int = 4,
    max_side: int = 48,
    seed: int = 0,
    attn_implementation: str = "eager",
):
    """A tiny Qwen3-VL and its processor (Qwen2-VL's image processor and the word tokenizer with
    Qwen's special tokens, as `tiny_qwen2_vl`). Its vision tower takes deepstack features after
    blocks `deepstack_layers`, which the LLM adds to the image tokens' residual after its first
    `len(deepstack_layers)` blocks; the learned position grid (6x6) is interpolated to each image."""
    tokenizer, processor, ids = qwen_processor(patch_size, max_side)
    text = text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 2)
    head_dim = llm_d_model // llm_heads
    # interleaved M-RoPE: the (t, h, w) sections share the head's head_dim / 2 frequencies
    section = [head_dim // 2 - 2 * (head_dim * 3 // 16), head_dim * 3 // 16, head_dim * 3 // 16]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section, "mrope_interleaved": True}
    vision = dict(depth=vision_layers, hidden_size=vision_d_model, intermediate_size=2 * vision_d_model, num_heads=4,
                  patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=llm_d_model,
                  num_position_embeddings=36, deepstack_visual_indexes=list(deepstack_layers))
    config = Qwen3VLConfig(
        text_config={**text, "head_dim": head_dim, "rope_parameters": rope},
        vision_config=vision,
        **ids,
    )
    return instantiate(Qwen3VLForConditionalGeneration, config, attn_implementation, seed), processor


__all__ = ["tiny_qwen3_vl"]
