"""A tiny Idefics3 or SmolVLM (SigLIP-like tower on tiles, pixel shuffle, Llama LLM) and an Idefics3 processor."""

from __future__ import annotations

from typing import Literal

from ...zoo.build import build_word_tokenizer
from .common import instantiate, text_kwargs


def tiny_idefics3(
    variant: Literal["idefics3", "smolvlm"] = "idefics3",
    *,
    tile: int = 16,
    patch_size: int = 4,
    longest_edge: int = 48,
    scale_factor: int = 2,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    llm_layers: int = 2,
    llm_d_model: int = 64,
    llm_heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "eager",
):
    """A tiny Idefics3 or SmolVLM (SigLIP-like tower on `tile`-pixel tiles, `scale_factor` pixel shuffle,
    Llama LLM) and an Idefics3 processor: images are resized to a `longest_edge` of 3 tiles, so
    the test images give 2 x 3, 3 x 2 or 3 x 3 tiles plus the global image.

    The tokenizer is the zoo's word tokenizer plus the separators the real ones carry (`<global-img>`,
    `<row_i_col_j>`). SmolVLM's own processor needs the `num2words` package (for video prompts) and
    builds the same image prompts, so both variants use the Idefics3 processor."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = build_word_tokenizer()
    tags = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<global-img>", *tags]})
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile},
                                                image_mean=[0.5] * 3, image_std=[0.5] * 3)
    n_tokens = (tile // patch_size // scale_factor) ** 2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=n_tokens)
    vision = dict(hidden_size=vision_d_model, intermediate_size=4 * vision_d_model, num_hidden_layers=vision_layers,
                  num_attention_heads=4, image_size=tile, patch_size=patch_size)
    text = LlamaConfig(**text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, llm_heads // 2))
    config_class, model_class = {"idefics3": (Idefics3Config, Idefics3ForConditionalGeneration),
                                 "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration)}[variant]
    config = config_class(vision_config=vision, text_config=text.to_dict(), image_token_id=processor.image_token_id,
                          scale_factor=scale_factor, tie_word_embeddings=False)
    return instantiate(model_class, config, attn_implementation, seed), processor


__all__ = ["tiny_idefics3"]
