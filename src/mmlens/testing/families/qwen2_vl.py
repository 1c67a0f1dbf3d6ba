"""A tiny Qwen2-VL or Qwen2.5-VL and its image-only processor, over the word tokenizer with Qwen's special tokens."""

from __future__ import annotations

from typing import Literal

from transformers import (
    Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ...model.architectures.qwen2_vl import QwenImageProcessor
from ...zoo.build import build_word_tokenizer
from .common import instantiate, text_kwargs


QWEN_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")


# Qwen's chat template, reduced to what the word tokenizer reads: each image is wrapped in its
# vision start/end tokens before the text.
QWEN_TEMPLATE = (
    "{% for message in messages %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ content['text'] }} {% endif %}{% endfor %}{% endfor %}"
)


def qwen_processor(patch_size: int, max_side: int):
    """The word tokenizer with Qwen's special tokens, a Qwen2-VL image processor (2 x 2 merge,
    images between 16x16 and `max_side`^2 pixels in area) and the processor over both; and the
    special tokens' ids as the model config names them."""
    tokenizer = build_word_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_TOKENS)})
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": 16 * 16, "longest_edge": max_side * max_side},
    )
    processor = QwenImageProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)
    return tokenizer, processor, ids


def tiny_qwen2_vl(
    version: Literal["2", "2.5"] = "2.5",
    *,
    patch_size: int = 4,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    llm_layers: int = 2,
    llm_d_model: int = 64,
    llm_heads: int = 4,
    max_side: int = 48,
    seed: int = 0,
    attn_implementation: str = "eager",
):
    """A tiny Qwen2-VL or Qwen2.5-VL and its processor. Images are resized to multiples of
    2 x `patch_size` pixels between 16x16 and `max_side`^2 pixels in area, so a 32x32 image is
    8x8 patches and 4x4 LLM tokens. Qwen2.5-VL's windows span 2x2 LLM tokens (block 0) and block
    1 attends over the whole image, so both attention rules run on every test image."""
    tokenizer, processor, ids = qwen_processor(patch_size, max_side)
    text = text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 2)
    head_dim = llm_d_model // llm_heads
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [head_dim // 8, head_dim // 8 * 3 // 2, head_dim // 8 * 3 // 2]}
    vision = dict(depth=vision_layers, num_heads=4, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2)
    if version == "2.5":
        vision.update(hidden_size=vision_d_model, intermediate_size=2 * vision_d_model, out_hidden_size=llm_d_model,
                      window_size=4 * patch_size, fullatt_block_indexes=[vision_layers - 1])
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    else:
        vision.update(embed_dim=vision_d_model, hidden_size=llm_d_model, mlp_ratio=2)
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    config = config_class(
        text_config={**text, "rope_parameters": rope},
        vision_config=vision,
        **ids,
    )
    return instantiate(model_class, config, attn_implementation, seed), processor


__all__ = ["QWEN_TEMPLATE", "QWEN_TOKENS", "qwen_processor", "tiny_qwen2_vl"]
