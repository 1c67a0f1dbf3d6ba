"""Tiny LLaVAs beyond the embedded recipe (`mmlens.testing.tiny_llava`): a Mistral or Qwen2 LLM, a DINOv2 tower."""

from __future__ import annotations

from typing import Literal

import torch
from transformers import (
    Dinov2Config, Dinov2WithRegistersConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig, Qwen2Config,
    Qwen3Config,
)

from ...model.architectures.mistral3 import Mistral3Processor
from ...zoo.build import build_llava, build_word_tokenizer
from .common import instantiate, text_kwargs
from .mistral3 import MISTRAL3_TOKENS


TEXT_CONFIGS = {"mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}


def tiny_llava_with(llm: Literal["mistral", "qwen2", "qwen3"], *, seed: int = 0, attn_implementation: str = "eager"):
    """A tiny LLaVA (CLIP tower) whose LLM is Mistral, Qwen2 (q/k/v biases) or Qwen3 (q/k norms) instead of Llama."""
    reference, processor = build_llava(seed=seed, llm_kv_heads=2, attn_implementation=attn_implementation)
    text = TEXT_CONFIGS[llm](**text_kwargs(processor.tokenizer, 64, 2, 4, 2))
    config = LlavaConfig(
        vision_config=reference.config.vision_config,
        text_config=text,
        image_token_id=reference.config.image_token_id,
        vision_feature_layer=reference.config.vision_feature_layer,
        vision_feature_select_strategy=reference.config.vision_feature_select_strategy,
        projector_hidden_act="gelu",
    )
    return instantiate(LlavaForConditionalGeneration, config, attn_implementation, seed), processor


def tiny_llava_dinov2(
    *, swiglu: bool = False, registers: int = 0, seed: int = 0, attn_implementation: str = "eager", **sizes
):
    """A tiny LLaVA whose tower is DINOv2 (CLS, layer scale, optionally a SwiGLU MLP and register
    tokens, which reach the LLM before each image's grid), Llama LLM; `sizes` are
    `mmlens.testing.tiny_llava`'s (image and patch size, widths, layers).

    The layer scales are drawn at random (DINOv2 initialises them to a constant), so a spec that
    forgot them would show."""
    reference, processor = build_llava(seed=seed, attn_implementation=attn_implementation, **sizes)  # CLIP-style processor
    clip = reference.config.vision_config
    config_class, extra = (Dinov2WithRegistersConfig, {"num_register_tokens": registers}) if registers else (Dinov2Config, {})
    vision = config_class(
        hidden_size=clip.hidden_size, num_hidden_layers=clip.num_hidden_layers, num_attention_heads=clip.num_attention_heads,
        mlp_ratio=4, image_size=clip.image_size, patch_size=clip.patch_size, use_swiglu_ffn=swiglu, **extra,
    )
    processor.num_additional_image_tokens = 1 + registers  # CLS and registers; "default" drops the CLS
    config = LlavaConfig(
        vision_config=vision,
        text_config=reference.config.text_config,
        image_token_id=reference.config.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = instantiate(LlavaForConditionalGeneration, config, attn_implementation, seed)
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layer:
            for scale in (layer.layer_scale1, layer.layer_scale2):
                scale.lambda1.copy_(1 + 0.5 * torch.randn_like(scale.lambda1))
    return model, processor


def tiny_llava_pixtral(
    *, patch_size: int = 8, longest_edge: int = 40, vision_layers: int = 2, vision_d_model: int = 32,
    llm_layers: int = 2, llm_d_model: int = 64, llm_heads: int = 4, seed: int = 0, attn_implementation: str = "eager",
):
    """A tiny Pixtral-12B in LLaVA format: LlavaForConditionalGeneration with a Pixtral tower (2-D
    rotary, images packed at their own size), LLaVA's MLP projector (one token per patch) and a
    Mistral LLM, with Hugging Face's Pixtral prompts (`Mistral3Processor`, merge size 1). The test
    images (40x50, 32x32, 61x37) become 32x40, 32x32 and 40x24 pixels: 4x5, 4x4 and 5x3 tokens. The
    tower's query and key weights are drawn large, so its attention is peaked and positions matter."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tokenizer = build_word_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(MISTRAL3_TOKENS)})
    image_processor = PixtralImageProcessorPil(size={"longest_edge": longest_edge}, patch_size=patch_size)
    processor = Mistral3Processor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                  spatial_merge_size=1)
    text = MistralConfig(**text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 2), head_dim=llm_d_model // llm_heads)
    vision = dict(model_type="pixtral", hidden_size=vision_d_model, intermediate_size=2 * vision_d_model,
                  num_hidden_layers=vision_layers, num_attention_heads=4, head_dim=vision_d_model // 4,
                  image_size=longest_edge, patch_size=patch_size, hidden_act="silu")
    config = LlavaConfig(vision_config=vision, text_config=text.to_dict(), image_token_id=processor.image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu",
                         tie_word_embeddings=False)
    model = instantiate(LlavaForConditionalGeneration, config, attn_implementation, seed)
    with torch.no_grad():
        for layer in model.model.vision_tower.transformer.layers:
            for proj in (layer.attention.q_proj, layer.attention.k_proj):
                proj.weight.normal_(0, 0.5)
    return model, processor


__all__ = ["tiny_llava_pixtral", "tiny_llava_with", "tiny_llava_dinov2"]
