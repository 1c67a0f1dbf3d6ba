"""A tiny VipLLaVA (CLIP tower, LayerNorm'd MLP projector over several tower layers, Llama LLM)."""

from __future__ import annotations

import torch
from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration

from ...zoo.build import build_llava
from .common import instantiate


def tiny_vipllava(
    *, feature_layers: tuple[int, ...] = (-2, -4, 1), vision_layers: int = 3, seed: int = 0,
    attn_implementation: str = "eager", **sizes,
):
    """A tiny VipLLaVA and its LLaVA processor: a 3-block CLIP tower whose hidden states
    `feature_layers` (default: block 2's input, the embeddings and block 1's input) are concatenated
    without CLS and LayerNorm'd (random affine, so a spec that skipped it would show) before the MLP;
    `sizes` are `mmlens.zoo.build.build_llava`'s (image and patch size, widths, layers)."""
    sizes.setdefault("llm_kv_heads", 2)
    reference, processor = build_llava(seed=seed, vision_layers=vision_layers, attn_implementation=attn_implementation,
                                       **sizes)
    config = VipLlavaConfig(
        vision_config=reference.config.vision_config,
        text_config=reference.config.text_config,
        image_token_id=reference.config.image_token_id,
        vision_feature_layer=list(feature_layers),
        projector_hidden_act="gelu",
    )
    model = instantiate(VipLlavaForConditionalGeneration, config, attn_implementation, seed)
    with torch.no_grad():
        norm = model.model.multi_modal_projector.projector_layernorm
        norm.weight.copy_(1 + 0.5 * torch.randn_like(norm.weight))
        norm.bias.normal_(0, 0.5)
    return model, processor


__all__ = ["tiny_vipllava"]
