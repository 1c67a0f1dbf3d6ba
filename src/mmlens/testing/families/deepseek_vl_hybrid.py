"""A tiny DeepSeek-VL hybrid (SigLIP and SAM towers, the two-tower aligner, Llama LLM) and its
DeepseekVLHybridProcessor."""

from __future__ import annotations

import torch
from transformers import (
    DeepseekVLHybridConfig, DeepseekVLHybridForConditionalGeneration, DeepseekVLHybridProcessor, LlamaConfig,
    SamVisionConfig, SiglipVisionConfig,
)
from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import (
    DeepseekVLHybridImageProcessorPil,
)

from .common import instantiate, text_kwargs, word_tokenizer


def tiny_deepseek_vl_hybrid(
    *, image_size: int = 32, high_res_size: int = 64, patch_size: int = 8, window_size: int = 3,
    vision_layers: int = 2, vision_d_model: int = 32, high_res_layers: int = 3, high_res_d_model: int = 32,
    llm_layers: int = 2, llm_d_model: int = 64, llm_heads: int = 4, seed: int = 0, attn_implementation: str = "eager",
):
    """A tiny DeepSeek-VL hybrid: by default a 32x32 SigLIP image and its 64x64 high-res copy both
    become 4x4 LLM tokens. SAM has 3 blocks on an 8x8 patch grid: windows of 3x3 (the grid padded to
    9x9, so padding positions are attended), block 1 global (the block the hybrid's neck reads).
    SAM's relative and absolute positions and the alpha mixing the global block's path in are zero
    at initialisation in Hugging Face; they are drawn here so every one of them changes the output."""
    tokenizer = word_tokenizer(image_token="<image_placeholder>")
    n_tokens = (image_size // patch_size) ** 2
    image_processor = DeepseekVLHybridImageProcessorPil(
        size={"height": image_size, "width": image_size}, high_res_size={"height": high_res_size, "width": high_res_size},
        min_size=4,
    )
    processor = DeepseekVLHybridProcessor(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=n_tokens)
    vision = SiglipVisionConfig(hidden_size=vision_d_model, intermediate_size=4 * vision_d_model,
                                num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                                patch_size=patch_size)
    high_res = SamVisionConfig(hidden_size=high_res_d_model, output_channels=high_res_d_model // 4,
                               num_hidden_layers=high_res_layers, num_attention_heads=4, image_size=high_res_size,
                               patch_size=patch_size, mlp_dim=2 * high_res_d_model, window_size=window_size,
                               global_attn_indexes=[1], initializer_range=0.02)
    text = LlamaConfig(**text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 2))
    config = DeepseekVLHybridConfig(vision_config=vision, high_res_vision_config=high_res, text_config=text,
                                    image_token_id=tokenizer.image_token_id, tie_word_embeddings=False)
    model = instantiate(DeepseekVLHybridForConditionalGeneration, config, attn_implementation, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sam = model.model.high_res_vision_model.vision_encoder
        zero_at_init = [sam.pos_embed, model.model.high_res_vision_alpha]
        zero_at_init += [p for layer in sam.layers for p in (layer.attn.rel_pos_h, layer.attn.rel_pos_w)]
        for parameter in zero_at_init:
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model, processor


__all__ = ["tiny_deepseek_vl_hybrid"]
