"""A tiny PaliGemma (SigLIP tower, linear projector, Gemma LLM) and its processor."""

from __future__ import annotations

from transformers import (
    GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipVisionConfig,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from ...zoo.build import build_word_tokenizer
from .common import instantiate, text_kwargs


def tiny_paligemma(
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    llm_layers: int = 2,
    llm_d_model: int = 64,
    llm_heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "eager",
):
    """A tiny PaliGemma (SigLIP tower, linear projector, Gemma LLM with one kv head) and its processor."""
    tokenizer = build_word_tokenizer()
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = (image_size // patch_size) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds its loc/seg tokens
    vision = SiglipVisionConfig(
        hidden_size=vision_d_model, intermediate_size=4 * vision_d_model, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=image_size, patch_size=patch_size, num_channels=3,
    )
    text = GemmaConfig(**text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 1), head_dim=llm_d_model // llm_heads)
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=llm_d_model,
        hidden_size=llm_d_model,
        vocab_size=len(tokenizer),
    )
    return instantiate(PaliGemmaForConditionalGeneration, config, attn_implementation, seed), processor


__all__ = ["tiny_paligemma"]
