"""A tiny Gemma 3 (SigLIP tower, k x k pooling, Gemma 3 LLM) and its Gemma3Processor."""

from __future__ import annotations

import torch
from transformers import (
    Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from .common import instantiate, text_kwargs, word_tokenizer


def gemma3_tokenizer():
    """The word tokenizer with Gemma 3's image tokens: `<start_of_image>` (the placeholder a prompt
    holds), `<image_soft_token>` (one per LLM image token) and `<end_of_image>`."""
    return word_tokenizer(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>")


def tiny_gemma3(
    *,
    image_size: int = 48,
    patch_size: int = 4,
    tokens_per_side: int = 3,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    llm_layers: int = 3,
    llm_d_model: int = 64,
    llm_heads: int = 4,
    sliding_window: int = 12,
    attn_logit_softcapping: float | None = None,
    seed: int = 0,
    attn_implementation: str = "eager",
):
    """A tiny Gemma 3 (SigLIP tower, 4x4 average pooling: 12x12 patches -> 3x3 LLM tokens; Gemma 3
    LLM with sandwich and q/k norms, two kv heads, a query_pre_attn_scalar apart from d_head, and
    sliding-window layers, shorter than the tests' prompts, around a full one) and its Gemma3Processor.

    Hugging Face initialises the projector to zero and every Gemma RMSNorm weight to zero (scale
    1); both are drawn at random here, so a spec that skipped any of them would show."""
    tokenizer = gemma3_tokenizer()
    n_tokens = tokens_per_side**2
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=n_tokens)
    vision = SiglipVisionConfig(
        hidden_size=vision_d_model, intermediate_size=4 * vision_d_model, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=image_size, patch_size=patch_size, num_channels=3, vision_use_head=False,
    )
    layer_types = ["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(llm_layers)]
    if "full_attention" not in layer_types:
        layer_types[-1] = "full_attention"
    text = Gemma3TextConfig(
        **text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 2),
        head_dim=llm_d_model // llm_heads,
        query_pre_attn_scalar=24,  # not d_head (16): a spec using 1/sqrt(d_head) would show
        sliding_window=sliding_window,
        layer_types=layer_types,
        attn_logit_softcapping=attn_logit_softcapping,
    )
    config = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=n_tokens,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
        tie_word_embeddings=False,
    )
    model = instantiate(Gemma3ForConditionalGeneration, config, attn_implementation, seed)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, vision_d_model**-0.5)
        for name, param in model.named_parameters():
            if "norm" in name and "model.vision_tower" not in name:  # Gemma's (1 + w) RMSNorms
                param.normal_(0, 0.5)
    return model, processor


__all__ = ["gemma3_tokenizer", "tiny_gemma3"]
