"""A tiny DeepSeek-VL (SigLIP tower, two-layer MLP aligner, Llama LLM) and its DeepseekVLProcessor."""

from __future__ import annotations

from transformers import (
    DeepseekVLConfig, DeepseekVLForConditionalGeneration, DeepseekVLProcessor, LlamaConfig, SiglipVisionConfig,
)
from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil

from .common import instantiate, text_kwargs, word_tokenizer


def tiny_deepseek_vl(
    *, image_size: int = 32, patch_size: int = 8, vision_layers: int = 2, vision_d_model: int = 32,
    llm_layers: int = 2, llm_d_model: int = 64, llm_heads: int = 4, seed: int = 0, attn_implementation: str = "eager",
):
    """A tiny DeepSeek-VL: a 32x32 image becomes 4x4 LLM tokens; the processor resizes the longest
    side to 32 and pads the image to a square. The SigLIP tower keeps its attention-pooling head,
    as the released checkpoints do, though the aligner never reads it."""
    tokenizer = word_tokenizer(image_token="<image_placeholder>")
    n_tokens = (image_size // patch_size) ** 2
    image_processor = DeepseekVLImageProcessorPil(size={"height": image_size, "width": image_size}, min_size=4)
    processor = DeepseekVLProcessor(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=n_tokens)
    vision = SiglipVisionConfig(
        hidden_size=vision_d_model, intermediate_size=4 * vision_d_model, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=image_size, patch_size=patch_size,
    )
    text = LlamaConfig(**text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 2))
    config = DeepseekVLConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id,
                              tie_word_embeddings=False)
    return instantiate(DeepseekVLForConditionalGeneration, config, attn_implementation, seed), processor


__all__ = ["tiny_deepseek_vl"]
