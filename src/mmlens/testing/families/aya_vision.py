"""A tiny Aya Vision (SigLIP on tiles plus a thumbnail, pixel shuffle + LayerNorm + SwiGLU, Cohere2 LLM of
parallel blocks with sliding-window and full-attention layers) and its processor."""

from __future__ import annotations

import torch
from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor, Cohere2Config, SiglipVisionConfig

from .common import instantiate, text_kwargs, word_tokenizer


def aya_vision_tokenizer():
    """The word tokenizer with Aya Vision's image tokens: `<|IMG_PATCH|>` (one per LLM image token),
    `<|START_OF_IMG|>` / `<|END_OF_IMG|>` around each image, `TILE` and `TILE_GLOBAL` (so each tile's
    `TILE_i` marker is several tokens, `TILE` then the word tokenizer's pieces of `_i`, as a real
    tokenizer may split it), `<|IMG_LINE_BREAK|>` and the prompt's `<image>`."""
    return word_tokenizer(image_token="<image>", start_of_image="<|START_OF_IMG|>", end_of_image="<|END_OF_IMG|>",
                          patch="<|IMG_PATCH|>", line_break="<|IMG_LINE_BREAK|>", tile="TILE", tile_global="TILE_GLOBAL")


def cohere2_text_config(tokenizer, d_model: int, layers: int, heads: int, sliding_window: int) -> Cohere2Config:
    """A tiny Cohere2 LLM whose layers alternate sliding-window (rotary) and full attention (none)."""
    kinds = ["sliding_attention" if layer % 2 == 0 else "full_attention" for layer in range(layers)]
    return Cohere2Config(**text_kwargs(tokenizer, d_model, layers, heads, 2), layer_types=kinds,
                         sliding_window=sliding_window, logit_scale=0.5)


def randomise_norm_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Every norm weight drawn at random (Hugging Face initialises them to ones), so a spec that
    skipped a norm, or read the wrong one, would show."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ("norm" in name or "layernorm" in name) and param.ndim == 1:
                param.copy_(1 + 0.5 * torch.randn_like(param))
    return model


def siglip_cohere2_model(model_class, config_class, tokenizer, *, tile: int = 16, patch_size: int = 4,
                         vision_layers: int = 2, vision_d_model: int = 32, llm_layers: int = 2, llm_d_model: int = 64,
                         llm_heads: int = 4, sliding_window: int = 12, seed: int = 0, attn_implementation: str = "eager",
                         **fields):
    """A SigLIP tower on `tile`-pixel tiles, a 2 x 2 pixel shuffle before the SwiGLU projector and a
    Cohere2 LLM whose layers alternate sliding-window and full attention, as `model_class` from
    `config_class` with the class's own `fields` (its image token), every norm weight random. The
    default window is shorter than an image's tokens, so the sliding layers' own mask matters."""
    vision = SiglipVisionConfig(hidden_size=vision_d_model, intermediate_size=2 * vision_d_model,
                                num_hidden_layers=vision_layers, num_attention_heads=4, image_size=tile,
                                patch_size=patch_size)
    text = cohere2_text_config(tokenizer, llm_d_model, llm_layers, llm_heads, sliding_window)
    config = config_class(vision_config=vision, text_config=text, downsample_factor=2,
                          alignment_intermediate_size=2 * llm_d_model, tie_word_embeddings=False, **fields)
    return randomise_norm_weights(instantiate(model_class, config, attn_implementation, seed))


def tiny_aya_vision(*, tile: int = 16, patch_size: int = 4, max_tiles: int = 6, **sizes):
    """A tiny Aya Vision (SigLIP on `tile`-pixel tiles, 2 x 2 pixel shuffle, LN + SwiGLU projector,
    Cohere2 LLM; `sizes`: the other keywords of `siglip_cohere2_model`) and its processor, which cuts
    images into up to `max_tiles` tiles plus a thumbnail: the test images give 3 x 2, 2 x 2 and 2 x 3 tiles."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tokenizer = aya_vision_tokenizer()
    image_processor = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True,
                                               min_patches=1, max_patches=max_tiles)
    # the processor counts tokens per tile as (img_size // patch_size)^2, its patch being a token's pixels
    processor = AyaVisionProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=2 * patch_size,
                                   img_size=tile, downsample_factor=1)
    model = siglip_cohere2_model(AyaVisionForConditionalGeneration, AyaVisionConfig, tokenizer, tile=tile,
                                 patch_size=patch_size, image_token_index=tokenizer.convert_tokens_to_ids("<|IMG_PATCH|>"),
                                 **sizes)
    return model, processor


def tiny_cohere2_vision(*, tile: int = 16, patch_size: int = 4, max_tiles: int = 6, **sizes):
    """A tiny Cohere2-Vision (SigLIP on `tile`-pixel tiles, 2 x 2 pixel shuffle, SwiGLU projector,
    Cohere2 LLM; `sizes` as for `tiny_aya_vision`) and its processor on `Cohere2VisionImageProcessorPil`
    (up to `max_tiles` tiles by Cohere2-Vision's canvas rule, plus a thumbnail)."""
    from transformers import Cohere2VisionConfig, Cohere2VisionForConditionalGeneration, Cohere2VisionProcessor

    from ...model.architectures.aya_vision.cohere2_tiling import Cohere2VisionImageProcessorPil

    tokenizer = word_tokenizer(boi_token="<|START_OF_IMG|>", eoi_token="<|END_OF_IMG|>", image_token="<|IMG_PATCH|>",
                               img_line_break_token="<|IMG_LINE_BREAK|>")
    tokens_per_side = tile // patch_size // 2
    image_processor = Cohere2VisionImageProcessorPil(size={"height": tile, "width": tile}, patch_size=tokens_per_side,
                                                     max_patches=max_tiles)
    processor = Cohere2VisionProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model = siglip_cohere2_model(Cohere2VisionForConditionalGeneration, Cohere2VisionConfig, tokenizer, tile=tile,
                                 patch_size=patch_size, image_token_id=tokenizer.image_token_id, **sizes)
    return model, processor


__all__ = ["aya_vision_tokenizer", "cohere2_text_config", "randomise_norm_weights", "siglip_cohere2_model", "tiny_aya_vision",
           "tiny_cohere2_vision"]
