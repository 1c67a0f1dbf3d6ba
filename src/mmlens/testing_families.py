"""Tiny random-weight models of every supported family, built from Hugging Face configs with a
fixed seed (no hub needed): the parity tests and the overhead benchmark run on them."""

from __future__ import annotations

from typing import Literal

import torch
from transformers import (
    Dinov2Config,
    Dinov2WithRegistersConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVisionConfig,
    LlamaConfig,
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
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from .zoo.build import build_llava, build_word_tokenizer

TEXT_CONFIGS = {"mistral": MistralConfig, "qwen2": Qwen2Config}


def _instantiate(model_class, config, attn_implementation: str, seed: int):
    """`model_class(config)` with `attn_implementation`, its random weights drawn after seeding
    torch with `seed`, in eval mode."""
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return model_class(config).eval()


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
    return _instantiate(LlavaForConditionalGeneration, config, attn_implementation, seed), processor


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
    model = _instantiate(LlavaForConditionalGeneration, config, attn_implementation, seed)
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
    return _instantiate(PaliGemmaForConditionalGeneration, config, attn_implementation, seed), processor


def gemma3_tokenizer():
    """The word tokenizer with Gemma 3's image tokens: `<start_of_image>` (the placeholder a prompt
    holds), `<image_soft_token>` (one per LLM image token) and `<end_of_image>`."""
    words = build_word_tokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=words.backend_tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
    )


def tiny_gemma3(
    *,
    image_size: int = 48,
    patch_size: int = 4,
    tokens_per_side: int = 3,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    llm_layers: int = 3,
    llm_d_model: int = 64,
    llm_heads: int = 4,
    sliding_window: int = 12,
    attn_logit_softcapping: float | None = None,
    seed: int = 0,
    attn_implementation: str = "eager",
):
    """A tiny Gemma 3 (SigLIP tower, 4x4 average pooling: 12x12 patches -> 3x3 LLM tokens; Gemma 3
    LLM with sandwich and q/k norms, two kv heads, a query_pre_attn_scalar apart from d_head, and
    sliding-window layers, shorter than the tests' prompts, around a full one) and its Gemma3Processor.

    Hugging Face initialises the projector to zero and every Gemma RMSNorm weight to zero (scale
    1); both are drawn at random here, so a spec that skipped any of them would show."""
    tokenizer = gemma3_tokenizer()
    n_tokens = tokens_per_side**2
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=n_tokens)
    vision = SiglipVisionConfig(
        hidden_size=vision_d_model, intermediate_size=4 * vision_d_model, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=image_size, patch_size=patch_size, num_channels=3, vision_use_head=False,
    )
    layer_types = ["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(llm_layers)]
    if "full_attention" not in layer_types:
        layer_types[-1] = "full_attention"
    text = Gemma3TextConfig(
        **_text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 2),
        head_dim=llm_d_model // llm_heads,
        query_pre_attn_scalar=24,  # not d_head (16): a spec using 1/sqrt(d_head) would show
        sliding_window=sliding_window,
        layer_types=layer_types,
        attn_logit_softcapping=attn_logit_softcapping,
    )
    config = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=n_tokens,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
        tie_word_embeddings=False,
    )
    model = _instantiate(Gemma3ForConditionalGeneration, config, attn_implementation, seed)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, vision_d_model**-0.5)
        for name, param in model.named_parameters():
            if "norm" in name and "model.vision_tower" not in name:  # Gemma's (1 + w) RMSNorms
                param.normal_(0, 0.5)
    return model, processor


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
    return _instantiate(LlavaNextForConditionalGeneration, config, attn_implementation, seed), processor


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
    return _instantiate(LlavaOnevisionForConditionalGeneration, config, attn_implementation, seed), processor


# ---------------------------------------------------------------- Idefics3 / SmolVLM
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
    return _instantiate(model_class, config, attn_implementation, seed), processor


# ---------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL
QWEN_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
# Qwen's chat template, reduced to what the word tokenizer reads: each image is wrapped in its
# vision start/end tokens before the text.
QWEN_TEMPLATE = (
    "{% for message in messages %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ content['text'] }} {% endif %}{% endfor %}{% endfor %}"
)


class QwenImageProcessor(Qwen2_5_VLProcessor):
    """Qwen2-VL's processor for images only: its video processor needs torchvision, which mmlens
    does not require (the image path, `mm_token_type_ids` included, is Hugging Face's own)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def _qwen_processor(patch_size: int, max_side: int):
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
    tokenizer, processor, ids = _qwen_processor(patch_size, max_side)
    text = _text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 2)
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
    return _instantiate(model_class, config, attn_implementation, seed), processor


# ---------------------------------------------------------------- Qwen3-VL
def tiny_qwen3_vl(
    *,
    patch_size: int = 4,
    vision_layers: int = 3,
    vision_d_model: int = 32,
    deepstack_layers: tuple[int, ...] = (0, 1),
    llm_layers: int = 3,
    llm_d_model: int = 64,
    llm_heads: int = 4,
    max_side: int = 48,
    seed: int = 0,
    attn_implementation: str = "eager",
):
    """A tiny Qwen3-VL and its processor (Qwen2-VL's image processor and the word tokenizer with
    Qwen's special tokens, as `tiny_qwen2_vl`). Its vision tower takes deepstack features after
    blocks `deepstack_layers`, which the LLM adds to the image tokens' residual after its first
    `len(deepstack_layers)` blocks; the learned position grid (6x6) is interpolated to each image."""
    tokenizer, processor, ids = _qwen_processor(patch_size, max_side)
    text = _text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 2)
    head_dim = llm_d_model // llm_heads
    # interleaved M-RoPE: the (t, h, w) sections share the head's head_dim / 2 frequencies
    section = [head_dim // 2 - 2 * (head_dim * 3 // 16), head_dim * 3 // 16, head_dim * 3 // 16]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section, "mrope_interleaved": True}
    vision = dict(depth=vision_layers, hidden_size=vision_d_model, intermediate_size=2 * vision_d_model, num_heads=4,
                  patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=llm_d_model,
                  num_position_embeddings=36, deepstack_visual_indexes=list(deepstack_layers))
    config = Qwen3VLConfig(
        text_config={**text, "head_dim": head_dim, "rope_parameters": rope},
        vision_config=vision,
        **ids,
    )
    return _instantiate(Qwen3VLForConditionalGeneration, config, attn_implementation, seed), processor
# ---------------------------------------------------------------- InternVL
class ImageOnlyInternVLProcessor(InternVLProcessor):
    """InternVLProcessor without its video processor, which needs torchvision (not installed
    here); the image path (GotOcr2 tiling, `<img>` + `<IMG_CONTEXT>` run + `</img>`) is Hugging Face's own."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, **kwargs)


def internvl_tokenizer():
    """The word tokenizer with InternVL's image tokens: `<IMG_CONTEXT>` (the placeholder, one per
    LLM image token), `<img>` and `</img>` around each image, and `<video>` (unused here)."""
    words = build_word_tokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=words.backend_tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", padding_side="left",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    )


def tiny_internvl(
    variant: Literal["internvl3", "internvit6b"] = "internvl3",
    *,
    llm: Literal["qwen2", "llama"] = "qwen2",
    tile: int = 16,
    patch_size: int = 4,
    max_tiles: int = 6,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    llm_layers: int = 2,
    llm_d_model: int = 64,
    llm_heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "eager",
):
    """A tiny InternVL (InternViT on `tile`-pixel tiles, 2 x 2 pixel shuffle, LN + MLP projector,
    Qwen2 or Llama LLM) and its processor, which cuts images into up to `max_tiles` tiles plus a thumbnail:
    the test images give 3 x 2, 2 x 2 and 2 x 3 tiles.

    "internvl3" has InternViT-300M's block (LayerNorms, no q/k norm, no final norm); "internvit6b"
    has the 6B tower's (RMSNorms, RMSNorms over the whole query and key width) and, to cover that
    option, the final LayerNorm of `use_mean_pooling=False`. Layer scales and every vision norm
    weight are drawn at random (HF initialises them to constants), so a spec that skipped any would show."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tokenizer = internvl_tokenizer()
    image_processor = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True,
                                               min_patches=1, max_patches=max_tiles)
    n_tokens = (tile // patch_size // 2) ** 2
    processor = ImageOnlyInternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=n_tokens)
    six_b = variant == "internvit6b"
    vision = InternVLVisionConfig(
        hidden_size=vision_d_model, intermediate_size=4 * vision_d_model, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=tile, patch_size=patch_size, norm_type="rms_norm" if six_b else "layer_norm",
        use_qk_norm=six_b, use_mean_pooling=not six_b,
    )
    text_config = {"qwen2": Qwen2Config, "llama": LlamaConfig}[llm]
    text = text_config(**_text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 2))
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.context_image_token_id,
                            image_seq_length=n_tokens, downsample_ratio=0.5, tie_word_embeddings=False)
    model = _instantiate(InternVLForConditionalGeneration, config, attn_implementation, seed)
    with torch.no_grad():
        for name, param in model.model.vision_tower.named_parameters():
            if "lambda_" in name or ("norm" in name and name.endswith("weight")):
                param.copy_(1 + 0.5 * torch.randn_like(param))
    return model, processor


# ---------------------------------------------------------------- Mistral 3 (Pixtral tower)
MISTRAL3_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")


def tiny_mistral3(
    *,
    patch_size: int = 4,
    longest_edge: int = 40,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    llm_layers: int = 2,
    llm_d_model: int = 64,
    llm_heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "eager",
):
    """A tiny Mistral 3 (Pixtral tower with 2-D rotary, 2x2 patch merger, Mistral LLM) and its
    processor (`Mistral3Processor`, Hugging Face's Pixtral prompts without torchvision). Images are
    scaled to fit `longest_edge` and rounded up to multiples of 2 x `patch_size`, so the test
    images (40x50, 32x32 and 61x37 pixels) become 32x40, 32x32 and 40x24: 4x5, 4x4 and 5x3 LLM
    tokens. The tower's query and key weights are drawn large, so its attention is peaked."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from .model.architectures.mistral3_processor import Mistral3Processor

    tokenizer = build_word_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(MISTRAL3_TOKENS)})
    image_processor = PixtralImageProcessorPil(size={"longest_edge": longest_edge}, patch_size=patch_size)
    processor = Mistral3Processor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                  spatial_merge_size=2)
    text = MistralConfig(**_text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 2), head_dim=llm_d_model // llm_heads)
    vision = dict(model_type="pixtral", hidden_size=vision_d_model, intermediate_size=2 * vision_d_model,
                  num_hidden_layers=vision_layers, num_attention_heads=4, head_dim=vision_d_model // 4,
                  image_size=longest_edge, patch_size=patch_size, hidden_act="silu")
    config = Mistral3Config(vision_config=vision, text_config=text.to_dict(), image_token_index=processor.image_token_id,
                            spatial_merge_size=2, vision_feature_layer=-1, projector_hidden_act="gelu",
                            tie_word_embeddings=False)
    model = _instantiate(Mistral3ForConditionalGeneration, config, attn_implementation, seed)
    with torch.no_grad():  # peaked tower attention (the init's is near uniform), so its rotary positions matter
        for layer in model.model.vision_tower.transformer.layers:
            for proj in (layer.attention.q_proj, layer.attention.k_proj):
                proj.weight.normal_(0, 0.5)
    return model, processor
