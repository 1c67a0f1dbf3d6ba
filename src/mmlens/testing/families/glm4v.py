"""A tiny GLM-4V (or GLM-4.6V with GLM-4V's dense LLM), a tiny GLM-4.5V (its mixture-of-experts LLM)
and their image-only processor, over the word tokenizer with GLM's image and video tokens."""

from __future__ import annotations

from typing import Literal

import torch
from transformers import (
    Glm4vConfig, Glm4vForConditionalGeneration, Glm4vMoeConfig, Glm4vMoeForConditionalGeneration, Glm46VConfig,
    Glm46VForConditionalGeneration,
)
from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

from ...model.architectures.glm4v import GlmImageProcessor
from ...zoo.build import build_word_tokenizer
from .common import instantiate, text_kwargs

GLM_TOKENS = ("<|begin_of_image|>", "<|image|>", "<|end_of_image|>", "<|video|>", "<|begin_of_video|>",
              "<|end_of_video|>")

# GLM's chat template, reduced to what the word tokenizer reads: each image between its begin/end tokens
GLM_TEMPLATE = (
    "{% for message in messages %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|begin_of_image|><|image|><|end_of_image|>{% else %}{{ content['text'] }} {% endif %}{% endfor %}{% endfor %}"
)


def glm_processor(patch_size: int, max_side: int):
    """The word tokenizer with GLM's special tokens, a GLM-4V image processor (2 x 2 merge; a still
    image counts as two frames, so the area bounds are two images of 16x16 and `max_side`^2 pixels)
    and the processor over both; and the special tokens' ids as the model config names them."""
    tokenizer = build_word_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(GLM_TOKENS)})
    fields = ("image_start_token_id", "image_token_id", "image_end_token_id", "video_token_id",
              "video_start_token_id", "video_end_token_id")
    ids = {field: tokenizer.convert_tokens_to_ids(token) for field, token in zip(fields, GLM_TOKENS)}
    image_processor = Glm4vImageProcessorPil(
        patch_size=patch_size, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": 2 * 16 * 16, "longest_edge": 2 * max_side * max_side},
    )
    processor = GlmImageProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=GLM_TEMPLATE)
    return tokenizer, processor, ids


def tiny_glm4v(
    version: Literal["4v", "4.6v"] = "4v",
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
    """A tiny GLM-4V (`"4v"`) or GLM-4.6V with the same dense LLM (`"4.6v"`) and its processor.
    Images are resized to multiples of 2 x `patch_size` pixels (a 32x32 image is 8x8 patches and
    4x4 LLM tokens); the tower's learned positions are a 6x6 grid interpolated to each image. The
    LLM rotates half of each head (GLM's partial rotary) with M-RoPE sections over t, h and w. The
    tower's weights are drawn with std 0.2: at Hugging Face's 0.02 its attention is so nearly uniform
    that a spec forgetting the 2-D rotary would pass the load check."""
    tokenizer, processor, ids = glm_processor(patch_size, max_side)
    text = text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 2)
    rotated_pairs = llm_d_model // llm_heads // 4  # half of each head rotated, in pairs
    section = [rotated_pairs - 2 * (rotated_pairs // 4), rotated_pairs // 4, rotated_pairs // 4]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section, "partial_rotary_factor": 0.5}
    vision = dict(depth=vision_layers, hidden_size=vision_d_model, num_heads=4, patch_size=patch_size,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=llm_d_model,
                  intermediate_size=2 * llm_d_model, image_size=6 * patch_size, initializer_range=0.2)
    if version == "4.6v":  # GLM-4.6V's class builds its sub-models from their model types
        config = Glm46VConfig(text_config={**text, "rope_parameters": rope, "model_type": "glm4v_text"},
                              vision_config={**vision, "model_type": "glm4v_vision"}, **ids)
        model_class = Glm46VForConditionalGeneration
    else:
        config = Glm4vConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision, **ids)
        model_class = Glm4vForConditionalGeneration
    return instantiate(model_class, config, attn_implementation, seed), processor


def tiny_glm4v_moe(
    version: Literal["4.5v", "4.6v"] = "4.5v",
    *,
    n_experts: int = 8,
    n_group: int = 2,
    topk_group: int = 1,
    top_k: int = 2,
    d_expert: int = 32,
    dense_layers: int = 1,
    routed_scaling_factor: float = 2.5,
    experts_implementation: str = "eager",
    seed: int = 0,
    attn_implementation: str = "eager",
    **sizes,
):
    """A tiny GLM-4.5V (`"4.5v"`), or GLM-4.6V's class holding the same model (`"4.6v"`): `tiny_glm4v`'s
    tower and merger (`sizes` are its keywords) before a GLM-4.5
    MoE LLM whose first `dense_layers` keep a dense MLP and whose others route each token, by a
    sigmoid router, to `top_k` of `n_experts` experts within the best `topk_group` of `n_group`
    groups, beside an ungated shared expert. The router's weights and its score-correction bias
    are drawn at random (Hugging Face starts the bias at zero and the weights near it), large
    enough that a spec ignoring the bias, the groups or `routed_scaling_factor` would choose or
    weigh other experts."""
    dense, processor = tiny_glm4v("4v", seed=seed, attn_implementation=attn_implementation, **sizes)
    config = dense.config.to_dict()
    text = {k: v for k, v in config["text_config"].items() if k not in ("model_type", "architectures")}
    text.update(n_routed_experts=n_experts, n_group=n_group, topk_group=topk_group, num_experts_per_tok=top_k,
                moe_intermediate_size=d_expert, n_shared_experts=1, first_k_dense_replace=dense_layers,
                routed_scaling_factor=routed_scaling_factor, norm_topk_prob=True)
    vision = {k: v for k, v in config["vision_config"].items() if k not in ("model_type", "architectures")}
    ids = {k: config[k] for k in ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
                                  "video_start_token_id", "video_end_token_id")}
    if version == "4.6v":  # GLM-4.6V's class builds its sub-models from their model types
        config = Glm46VConfig(text_config={**text, "model_type": "glm4v_moe_text"},
                              vision_config={**vision, "model_type": "glm4v_moe_vision"}, **ids)
        model_class = Glm46VForConditionalGeneration
    else:
        config, model_class = Glm4vMoeConfig(text_config=text, vision_config=vision, **ids), Glm4vMoeForConditionalGeneration
    config._experts_implementation = experts_implementation
    model = instantiate(model_class, config, attn_implementation, seed)
    with torch.no_grad():
        for layer in model.model.language_model.layers[dense_layers:]:
            layer.mlp.gate.weight.normal_(0, 0.5)
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    return model, processor


__all__ = ["GLM_TEMPLATE", "GLM_TOKENS", "glm_processor", "tiny_glm4v", "tiny_glm4v_moe"]
