"""Tiny LLaVAs beyond the embedded recipe (`mmlens.testing.tiny_llava`): a Mistral or Qwen2 LLM, a DINOv2 tower."""

from __future__ import annotations

from typing import Literal

import torch
from transformers import (
    Dinov2Config, Dinov2WithRegistersConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig, Qwen2Config,
)

from ...zoo.build import build_llava
from .common import instantiate, text_kwargs


TEXT_CONFIGS = {"mistral": MistralConfig, "qwen2": Qwen2Config}


def tiny_llava_with(llm: Literal["mistral", "qwen2"], *, seed: int = 0, attn_implementation: str = "eager"):
    """A tiny LLaVA (CLIP tower) whose LLM is Mistral or Qwen2 (q/k/v biases) instead of Llama."""
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


__all__ = ["tiny_llava_with", "tiny_llava_dinov2"]
