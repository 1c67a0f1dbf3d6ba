"""A tiny LightOnOCR (Pixtral tower, RMSNorm + 2x2 patch merger + MLP, Qwen3 LLM) and Hugging Face's
own `LightOnOcrProcessor` on the PIL Pixtral image processor (no torchvision needed)."""

from __future__ import annotations

import torch
from transformers import LightOnOcrConfig, LightOnOcrForConditionalGeneration, Qwen3Config
from transformers.models.lighton_ocr.processing_lighton_ocr import LightOnOcrProcessor
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

from .common import instantiate, text_kwargs, word_tokenizer


def tiny_lighton_ocr(
    *, patch_size: int = 4, longest_edge: int = 40, vision_layers: int = 2, vision_d_model: int = 32,
    llm_layers: int = 2, llm_d_model: int = 64, llm_heads: int = 4, seed: int = 0, attn_implementation: str = "eager",
):
    """A tiny LightOnOCR and its processor. Images are scaled to fit `longest_edge` and rounded up to
    multiples of 2 x `patch_size` (the image processor's patch is the merged one, as in the released
    preprocessor config), so the test images (40x50, 32x32, 61x37) become 4x5, 4x4 and 5x3 LLM
    tokens, each image one run of `[IMG]`. The tower's query and key weights are drawn large, so its
    attention is peaked and its rotary positions matter."""
    tokenizer = word_tokenizer(image_token="[IMG]", image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")
    image_processor = PixtralImageProcessorPil(size={"longest_edge": longest_edge}, patch_size=2 * patch_size)
    processor = LightOnOcrProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                    spatial_merge_size=2)
    text = Qwen3Config(**text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 2), head_dim=llm_d_model // llm_heads)
    vision = dict(model_type="pixtral", hidden_size=vision_d_model, intermediate_size=2 * vision_d_model,
                  num_hidden_layers=vision_layers, num_attention_heads=4, head_dim=vision_d_model // 4,
                  image_size=longest_edge, patch_size=patch_size, hidden_act="silu")
    config = LightOnOcrConfig(vision_config=vision, text_config=text.to_dict(), image_token_id=tokenizer.image_token_id,
                              spatial_merge_size=2, tie_word_embeddings=False)
    model = instantiate(LightOnOcrForConditionalGeneration, config, attn_implementation, seed)
    with torch.no_grad():
        for layer in model.model.vision_encoder.transformer.layers:
            for proj in (layer.attention.q_proj, layer.attention.k_proj):
                proj.weight.normal_(0, 0.5)
    return model, processor


__all__ = ["tiny_lighton_ocr"]
