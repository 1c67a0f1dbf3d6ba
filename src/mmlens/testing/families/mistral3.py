"""A tiny Mistral 3 (Pixtral tower, 2x2 patch merger, Mistral LLM) and its processor without torchvision."""

from __future__ import annotations

import torch
from transformers import MistralConfig

from ...model.architectures.mistral3 import Mistral3Processor
from ...zoo.build import build_word_tokenizer
from .common import instantiate, text_kwargs


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


    tokenizer = build_word_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(MISTRAL3_TOKENS)})
    image_processor = PixtralImageProcessorPil(size={"longest_edge": longest_edge}, patch_size=patch_size)
    processor = Mistral3Processor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                  spatial_merge_size=2)
    text = MistralConfig(**text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 2), head_dim=llm_d_model // llm_heads)
    vision = dict(model_type="pixtral", hidden_size=vision_d_model, intermediate_size=2 * vision_d_model,
                  num_hidden_layers=vision_layers, num_attention_heads=4, head_dim=vision_d_model // 4,
                  image_size=longest_edge, patch_size=patch_size, hidden_act="silu")
    config = Mistral3Config(vision_config=vision, text_config=text.to_dict(), image_token_index=processor.image_token_id,
                            spatial_merge_size=2, vision_feature_layer=-1, projector_hidden_act="gelu",
                            tie_word_embeddings=False)
    model = instantiate(Mistral3ForConditionalGeneration, config, attn_implementation, seed)
    with torch.no_grad():  # peaked tower attention (the init's is near uniform), so its rotary positions matter
        for layer in model.model.vision_tower.transformer.layers:
            for proj in (layer.attention.q_proj, layer.attention.k_proj):
                proj.weight.normal_(0, 0.5)
    return model, processor


__all__ = ["MISTRAL3_TOKENS", "tiny_mistral3"]
