"""A tiny InternVL (InternViT on tiles, pixel shuffle, LN + MLP, Qwen2 or Llama LLM) and its image-only processor."""

from __future__ import annotations

from typing import Literal

import torch
from transformers import (
    InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, LlamaConfig, Qwen2Config,
)

from ...model.architectures.internvl import ImageOnlyInternVLProcessor
from .common import instantiate, text_kwargs, word_tokenizer


def internvl_tokenizer():
    """The word tokenizer with InternVL's image tokens: `<IMG_CONTEXT>` (the placeholder, one per
    LLM image token), `<img>` and `</img>` around each image, and `<video>` (unused here)."""
    return word_tokenizer(start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
                          video_token="<video>")


def tiny_internvl(
    variant: Literal["internvl3", "internvit6b"] = "internvl3",
    *,
    llm: Literal["qwen2", "llama"] = "qwen2",
    tile: int = 16,
    patch_size: int = 4,
    max_tiles: int = 6,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    llm_layers: int = 2,
    llm_d_model: int = 64,
    llm_heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "eager",
):
    """A tiny InternVL (InternViT on `tile`-pixel tiles, 2 x 2 pixel shuffle, LN + MLP projector,
    Qwen2 or Llama LLM) and its processor, which cuts images into up to `max_tiles` tiles plus a thumbnail:
    the test images give 3 x 2, 2 x 2 and 2 x 3 tiles.

    "internvl3" has InternViT-300M's block (LayerNorms, no q/k norm, no final norm); "internvit6b"
    has the 6B tower's (RMSNorms, RMSNorms over the whole query and key width) and, to cover that
    option, the final LayerNorm of `use_mean_pooling=False`. Layer scales and every vision norm
    weight are drawn at random (HF initialises them to constants), so a spec that skipped any would show."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tokenizer = internvl_tokenizer()
    image_processor = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True,
                                               min_patches=1, max_patches=max_tiles)
    n_tokens = (tile // patch_size // 2) ** 2
    processor = ImageOnlyInternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=n_tokens)
    six_b = variant == "internvit6b"
    vision = InternVLVisionConfig(
        hidden_size=vision_d_model, intermediate_size=4 * vision_d_model, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=tile, patch_size=patch_size, norm_type="rms_norm" if six_b else "layer_norm",
        use_qk_norm=six_b, use_mean_pooling=not six_b,
    )
    text_config = {"qwen2": Qwen2Config, "llama": LlamaConfig}[llm]
    text = text_config(**text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 2))
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.context_image_token_id,
                            image_seq_length=n_tokens, downsample_ratio=0.5, tie_word_embeddings=False)
    model = instantiate(InternVLForConditionalGeneration, config, attn_implementation, seed)
    with torch.no_grad():
        for name, param in model.model.vision_tower.named_parameters():
            if "lambda_" in name or ("norm" in name and name.endswith("weight")):
                param.copy_(1 + 0.5 * torch.randn_like(param))
    return model, processor


__all__ = ["internvl_tokenizer", "tiny_internvl"]
