"""A tiny Gemma 4 (its own vision encoder, position-wise k x k pooling, a Gemma 4 LLM) and its images-only Gemma 4 processor."""

from __future__ import annotations

import torch
from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig, Gemma4VisionConfig
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from ...model.architectures.gemma4.processor import Gemma4ImageProcessor
from .common import instantiate, text_kwargs, word_tokenizer

# Gemma4ImageProcessorPil accepts only these budgets of soft tokens per image (its `max_soft_tokens`)
SMALLEST_SOFT_TOKEN_BUDGET = 70


def gemma4_tokenizer():
    """The word tokenizer with Gemma 4's image tokens (`<|image|>`, one per LLM image token, between
    `<start_of_image>` and `<end_of_image>`), the audio markers its processor insists on and the
    video token, whose embedding Hugging Face looks up when the LLM starts from embeddings."""
    return word_tokenizer(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<|image|>",
                          boa_token="<start_of_audio>", eoa_token="<end_of_audio>", audio_token="<|audio|>",
                          video_token="<|video|>")


def tiny_gemma4(
    *,
    patch_size: int = 4,
    pooling_kernel_size: int = 2,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    llm_layers: int = 3,
    llm_d_model: int = 64,
    llm_heads: int = 4,
    sliding_window: int = SMALLEST_SOFT_TOKEN_BUDGET,
    attention_k_eq_v: bool = False,
    bidirectional_attention: str | None = None,
    per_layer_input: int = 0,
    kv_shared_layers: int = 0,
    double_wide_mlp: bool = False,
    experts: int = 0,
    seed: int = 0,
    attn_implementation: str = "eager",
):
    """A tiny Gemma 4: each image resized, keeping its aspect ratio, to the largest multiple of
    `patch_size * pooling_kernel_size` within 70 soft tokens' worth of patches, its patches pooled
    k x k by position into soft tokens (a grid per image, its size from the image's shape); a dense
    Gemma 4 LLM (sandwich norms, q/k/v norms, sliding-window layers around a full one with its own
    head size and partial rotary), without experts. `per_layer_input` (d of each block's per-layer
    input), `kv_shared_layers` (the last blocks reuse earlier keys and values) and `double_wide_mlp`
    (those blocks' MLP twice as wide) make it an E2B / E4B-style LLM; `experts` (of which each token
    takes 2) a 26B-A4B-style one, experts beside every block's dense MLP.
    `bidirectional_attention="vision"` makes its images attend both ways in the sliding layers
    (Hugging Face's `use_bidirectional_attention`, as the larger released checkpoints).

    Hugging Face initialises every norm weight, the layer scalars and the router's scales to one; they
    are drawn at random here, so a hooked block that skipped any of them would show."""
    tokenizer = gemma4_tokenizer()
    image_processor = Gemma4ImageProcessorPil(
        patch_size=patch_size, pooling_kernel_size=pooling_kernel_size, max_soft_tokens=SMALLEST_SOFT_TOKEN_BUDGET,
    )
    processor = Gemma4ImageProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     image_seq_length=SMALLEST_SOFT_TOKEN_BUDGET)
    vision = Gemma4VisionConfig(
        hidden_size=vision_d_model, intermediate_size=4 * vision_d_model, num_hidden_layers=vision_layers,
        num_attention_heads=4, num_key_value_heads=4, head_dim=vision_d_model // 4, patch_size=patch_size,
        pooling_kernel_size=pooling_kernel_size, position_embedding_size=64,
    )
    layer_types = ["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(llm_layers)]
    layer_types[-1] = "full_attention"
    text = Gemma4TextConfig(
        **text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 2),
        head_dim=llm_d_model // llm_heads,
        global_head_dim=2 * llm_d_model // llm_heads,  # full-attention layers' own head size, as released
        sliding_window=sliding_window,
        layer_types=layer_types,
        hidden_size_per_layer_input=per_layer_input,
        num_kv_shared_layers=kv_shared_layers,
        use_double_wide_mlp=double_wide_mlp,
        enable_moe_block=bool(experts),
        num_experts=experts or None,
        top_k_experts=2 if experts else None,
        moe_intermediate_size=llm_d_model // 2 if experts else None,
        attention_k_eq_v=attention_k_eq_v,
        use_bidirectional_attention=bidirectional_attention,
        vocab_size_per_layer_input=len(tokenizer),
    )
    config = Gemma4Config(
        vision_config=vision,
        text_config=text,
        audio_config=None,
        boi_token_id=tokenizer.boi_token_id,
        eoi_token_id=tokenizer.eoi_token_id,
        image_token_id=tokenizer.image_token_id,
        audio_token_id=tokenizer.audio_token_id,
        video_token_id=tokenizer.video_token_id,
        boa_token_id=tokenizer.boa_token_id,
        eoa_token_index=tokenizer.eoa_token_id,
        tie_word_embeddings=False,
    )
    model = instantiate(Gemma4ForConditionalGeneration, config, attn_implementation, seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(("position_embedding_table", "router.scale", "per_expert_scale")):
                param.normal_(0.0 if name.endswith("position_embedding_table") else 1.0, 0.2)
        for layer in model.model.language_model.layers:
            layer.layer_scalar.uniform_(0.5, 1.5)
    return model, processor


__all__ = ["gemma4_tokenizer", "tiny_gemma4"]
