"""A tiny LLaVA-OneVision (SigLIP tower on anyres tiles, MLP projector, Qwen2 LLM) and its image-only processor."""

from __future__ import annotations

from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from ...model.architectures.llava_onevision import ImageOnlyOnevisionProcessor
from ...zoo.build import build_llava
from .common import instantiate, text_kwargs


def tiny_llava_onevision(
    *,
    tile: int = 32,
    patch_size: int = 8,
    pinpoints: tuple[tuple[int, int], ...] = ((32, 64), (64, 32), (64, 64), (32, 96)),
    seed: int = 0,
    attn_implementation: str = "eager",
    **sizes,
):
    """A tiny LLaVA-OneVision (SigLIP tower on `tile`-pixel tiles, MLP projector, Qwen2 LLM) and its
    processor; rows with one image are tiled, rows with several are not. `sizes` are
    `build_llava`'s widths and depths (the LLM's apply to the Qwen2 LLM)."""
    reference, llava_processor = build_llava("siglip", seed=seed, image_size=tile, patch_size=patch_size,
                                             attn_implementation=attn_implementation, **sizes)
    tokenizer = llava_processor.tokenizer
    pins = [list(p) for p in pinpoints]
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, image_grid_pinpoints=pins)
    processor = ImageOnlyOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        num_image_tokens=(tile // patch_size) ** 2, vision_feature_select_strategy="full")
    config = LlavaOnevisionConfig(
        vision_config=reference.config.vision_config,
        text_config=Qwen2Config(**text_kwargs(tokenizer, sizes.get("llm_d_model", 64), sizes.get("llm_layers", 2),
                                               sizes.get("llm_heads", 4), 2)),
        image_token_id=reference.config.image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=pins,
        projector_hidden_act="gelu",
    )
    return instantiate(LlavaOnevisionForConditionalGeneration, config, attn_implementation, seed), processor


__all__ = ["tiny_llava_onevision"]
