"""A tiny LLaVA-NeXT (CLIP tower on anyres tiles, MLP projector, Llama LLM) and its processor."""

from __future__ import annotations

from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from ...zoo.build import build_llava
from .common import instantiate


def tiny_llava_next(
    *,
    tile: int = 32,
    patch_size: int = 8,
    pinpoints: tuple[tuple[int, int], ...] = ((32, 64), (64, 32), (64, 64), (32, 96)),
    seed: int = 0,
    attn_implementation: str = "eager",
    **sizes,
):
    """A tiny LLaVA-NeXT (CLIP tower on `tile`-pixel tiles, MLP projector, Llama LLM) and its
    processor: the grid resolutions `pinpoints` give wide, tall and square tile grids; `sizes` are
    `mmlens.zoo.build.build_llava`'s widths and depths."""
    reference, llava_processor = build_llava(seed=seed, image_size=tile, patch_size=patch_size,
                                             attn_implementation=attn_implementation, **sizes)
    tokenizer = llava_processor.tokenizer
    pins = [list(p) for p in pinpoints]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pins,
        image_mean=llava_processor.image_processor.image_mean, image_std=llava_processor.image_processor.image_std,
    )
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaNextConfig(
        vision_config=reference.config.vision_config,
        text_config=reference.config.text_config,
        image_token_id=reference.config.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=pins,
        projector_hidden_act="gelu",
    )
    return instantiate(LlavaNextForConditionalGeneration, config, attn_implementation, seed), processor


__all__ = ["tiny_llava_next"]
