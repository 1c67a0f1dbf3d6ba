"""Tiny random-weight models of every supported family, built from Hugging Face configs with a
fixed seed (no hub needed): the parity tests and the overhead benchmark run on them."""

from __future__ import annotations

from typing import Literal

import torch
from transformers import (
    Dinov2Config,
    Dinov2WithRegistersConfig,
    GemmaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    MistralConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from .zoo.build import build_llava, build_word_tokenizer

TEXT_CONFIGS = {"mistral": MistralConfig, "qwen2": Qwen2Config}


def _text_kwargs(tokenizer, d_model: int, layers: int, heads: int, kv_heads: int) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=4 * d_model,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def tiny_llava_with(llm: Literal["mistral", "qwen2"], *, seed: int = 0, attn_implementation: str = "eager"):
    """A tiny LLaVA (CLIP tower) whose LLM is Mistral or Qwen2 (q/k/v biases) instead of Llama."""
    reference, processor = build_llava(seed=seed, llm_kv_heads=2, attn_implementation=attn_implementation)
    text = TEXT_CONFIGS[llm](**_text_kwargs(processor.tokenizer, 64, 2, 4, 2))
    config = LlavaConfig(
        vision_config=reference.config.vision_config,
        text_config=text,
        image_token_id=reference.config.image_token_id,
        vision_feature_layer=reference.config.vision_feature_layer,
        vision_feature_select_strategy=reference.config.vision_feature_select_strategy,
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval(), processor


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
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layer:
            for scale in (layer.layer_scale1, layer.layer_scale2):
                scale.lambda1.copy_(1 + 0.5 * torch.randn_like(scale.lambda1))
    return model, processor


def tiny_paligemma(
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    llm_layers: int = 2,
    llm_d_model: int = 64,
    llm_heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "eager",
):
    """A tiny PaliGemma (SigLIP tower, linear projector, Gemma LLM with one kv head) and its processor."""
    tokenizer = build_word_tokenizer()
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = (image_size // patch_size) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds its loc/seg tokens
    vision = SiglipVisionConfig(
        hidden_size=vision_d_model, intermediate_size=4 * vision_d_model, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=image_size, patch_size=patch_size, num_channels=3,
    )
    text = GemmaConfig(**_text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 1), head_dim=llm_d_model // llm_heads)
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=llm_d_model,
        hidden_size=llm_d_model,
        vocab_size=len(tokenizer),
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return PaliGemmaForConditionalGeneration(config).eval(), processor


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
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(config).eval(), processor


class ImageOnlyOnevisionProcessor(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor without its video processor, which needs torchvision (not installed
    here); images only. Its own signature leaves `video_processor` out of the processor's parts."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, **kwargs)
        self.video_token = self.video_token_id = None  # the word tokenizer has no <video>: unknown words are not videos


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
        text_config=Qwen2Config(**_text_kwargs(tokenizer, sizes.get("llm_d_model", 64), sizes.get("llm_layers", 2),
                                               sizes.get("llm_heads", 4), 2)),
        image_token_id=reference.config.image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=pins,
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(config).eval(), processor


def tiny_idefics3(
    variant: Literal["idefics3", "smolvlm"] = "idefics3",
    *,
    tile: int = 16,
    patch_size: int = 4,
    longest_edge: int = 48,
    scale_factor: int = 2,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    llm_layers: int = 2,
    llm_d_model: int = 64,
    llm_heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "eager",
):
    """A tiny Idefics3 or SmolVLM (SigLIP-like tower on `tile`-pixel tiles, `scale_factor` pixel shuffle,
    Llama LLM) and an Idefics3 processor: images are resized to a `longest_edge` of 3 tiles, so
    the test images give 2 x 3, 3 x 2 or 3 x 3 tiles plus the global image.

    The tokenizer is the zoo's word tokenizer plus the separators the real ones carry (`<global-img>`,
    `<row_i_col_j>`). SmolVLM's own processor needs the `num2words` package (for video prompts) and
    builds the same image prompts, so both variants use the Idefics3 processor."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = build_word_tokenizer()
    tags = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<global-img>", *tags]})
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile},
                                                image_mean=[0.5] * 3, image_std=[0.5] * 3)
    n_tokens = (tile // patch_size // scale_factor) ** 2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=n_tokens)
    vision = dict(hidden_size=vision_d_model, intermediate_size=4 * vision_d_model, num_hidden_layers=vision_layers,
                  num_attention_heads=4, image_size=tile, patch_size=patch_size)
    text = LlamaConfig(**_text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, llm_heads // 2))
    config_class, model_class = {"idefics3": (Idefics3Config, Idefics3ForConditionalGeneration),
                                 "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration)}[variant]
    config = config_class(vision_config=vision, text_config=text.to_dict(), image_token_id=processor.image_token_id,
                          scale_factor=scale_factor, tie_word_embeddings=False)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return model_class(config).eval(), processor
