"""A tiny Qwen3.5 (Qwen3-VL's tower without deepstack, a hybrid LLM of gated-delta-rule and gated
full-attention layers) and its processor (Qwen2-VL's)."""

from __future__ import annotations

from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

from .common import instantiate, text_kwargs
from .qwen2_vl import qwen_processor

# full attention first, so a wrong attention spec shows at `blocks.0`, then both kinds again
LAYER_TYPES = ("full_attention", "linear_attention", "linear_attention", "full_attention")


def tiny_qwen3_5(
    *,
    patch_size: int = 4,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    layer_types: tuple[str, ...] = LAYER_TYPES,
    llm_d_model: int = 64,
    llm_heads: int = 4,
    linear_key_heads: int = 2,
    linear_value_heads: int = 4,
    linear_head_dim: int = 8,
    max_side: int = 48,
    seed: int = 0,
    attn_implementation: str = "eager",
):
    """A tiny Qwen3.5 and its processor (Qwen2-VL's image processor and the word tokenizer with
    Qwen's special tokens, as `tiny_qwen2_vl`). Its LLM's `layer_types` interleave linear attention
    (a gated delta rule: `linear_key_heads` query/key heads of `linear_head_dim`, each serving
    `linear_value_heads / linear_key_heads` value heads; a 4-tap causal convolution) with full
    attention whose q_proj also emits an output gate, rotary on half of each head (M-RoPE's t, h
    and w all present) and q/k norms; the learned position grid is 6x6."""
    tokenizer, processor, ids = qwen_processor(patch_size, max_side)
    text = text_kwargs(tokenizer, llm_d_model, len(layer_types), llm_heads, 2)
    head_dim = llm_d_model // llm_heads
    rotary = head_dim // 2  # partial_rotary_factor 0.5: the (t, h, w) sections share its rotary / 2 frequencies
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "mrope_section": [rotary // 2 - 2 * (rotary // 8), rotary // 8, rotary // 8], "mrope_interleaved": True}
    linear = dict(linear_conv_kernel_dim=4, linear_key_head_dim=linear_head_dim, linear_value_head_dim=linear_head_dim,
                  linear_num_key_heads=linear_key_heads, linear_num_value_heads=linear_value_heads)
    vision = dict(depth=vision_layers, hidden_size=vision_d_model, intermediate_size=2 * vision_d_model, num_heads=4,
                  patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=llm_d_model,
                  num_position_embeddings=36)
    config = Qwen3_5Config(
        text_config={**text, **linear, "head_dim": head_dim, "rope_parameters": rope, "layer_types": list(layer_types)},
        vision_config=vision,
        **ids,
    )
    return instantiate(Qwen3_5ForConditionalGeneration, config, attn_implementation, seed), processor


__all__ = ["LAYER_TYPES", "tiny_qwen3_5"]
