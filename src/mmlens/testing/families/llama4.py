"""A tiny Llama 4 (unfold-patch tower with 2-D rotary and CLS, pixel shuffle, MoE LLM with NoPE and
chunked layers) and its processor without torchvision."""

from __future__ import annotations

import torch

from ...model.architectures.llama4 import Llama4ImageProcessorPil
from .common import instantiate, text_kwargs, word_tokenizer

LLAMA4_TOKENS = dict(image_token="<|image|>", boi_token="<|image_start|>", eoi_token="<|image_end|>",
                     patch_token="<|patch|>", tile_x_token="<|tile_x_separator|>", tile_y_token="<|tile_y_separator|>")


def tiny_llama4(
    *,
    tile: int = 16,
    patch_size: int = 4,
    max_tiles: int = 6,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    llm_layers: int = 4,
    llm_d_model: int = 64,
    llm_heads: int = 4,
    n_experts: int = 4,
    top_k: int = 2,
    chunk_size: int = 24,
    seed: int = 0,
    attn_implementation: str = "eager",
):
    """A tiny Llama 4 and its `Llama4Processor` (on `Llama4ImageProcessorPil`, no chat template).

    Images become up to `max_tiles` tiles of `tile` pixels plus a global image, each 2x2 tokens
    (`patch_size` 4, pixel shuffle 0.5): the test images (40x50, 32x32, 61x37) get 2x3, 2x2 and 3x2
    tiles (the last with a column of padding), an image of at most one tile a single padded tile. The LLM alternates MoE and dense layers (`interleave_moe_layer_step` 2: layers 1, 3 route
    each token to `top_k` of `n_experts` experts beside a shared expert); layer 3 is a NoPE layer
    with full attention and temperature tuning (`floor_scale` 4, so it acts within the tests'
    prompts), the others rotary layers with L2 q/k norms and `chunk_size`-token chunked attention,
    shorter than the prompts. The tower's query and key weights are drawn large, so its attention
    is peaked and its rotary positions matter; the patch embedding's and the adapter's are drawn at unit
    gain (the init's leave the pixels a small part of the embeddings beside the learned positions and
    shrink the image features a thousandfold: a fixed-penalty probe reads them as constant)."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4Processor, Llama4TextConfig

    tokenizer = word_tokenizer(**LLAMA4_TOKENS)
    image_processor = Llama4ImageProcessorPil(size={"height": tile, "width": tile}, max_patches=max_tiles)
    processor = Llama4Processor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                pixel_shuffle_ratio=0.5, chat_template=None)
    sizes = text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, llm_heads // 2)
    text = Llama4TextConfig(**sizes, intermediate_size_mlp=sizes["intermediate_size"], num_local_experts=n_experts,
                            num_experts_per_tok=top_k, interleave_moe_layer_step=2, attention_chunk_size=chunk_size,
                            no_rope_layers=[int((i + 1) % 4 != 0) for i in range(llm_layers)], floor_scale=4,
                            attn_scale=0.1, use_qk_norm=True, head_dim=llm_d_model // llm_heads)
    vision = dict(hidden_size=vision_d_model, intermediate_size=4 * vision_d_model, num_hidden_layers=vision_layers,
                  num_attention_heads=4, image_size=tile, patch_size=patch_size, pixel_shuffle_ratio=0.5,
                  projector_input_dim=2 * vision_d_model, projector_output_dim=2 * vision_d_model,
                  vision_output_dim=2 * vision_d_model, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config = Llama4Config(vision_config=vision, text_config=text.to_dict(), tie_word_embeddings=False,
                          image_token_index=tokenizer.convert_tokens_to_ids(LLAMA4_TOKENS["patch_token"]),
                          boi_token_index=tokenizer.convert_tokens_to_ids(LLAMA4_TOKENS["boi_token"]),
                          eoi_token_index=tokenizer.convert_tokens_to_ids(LLAMA4_TOKENS["eoi_token"]))
    model = instantiate(Llama4ForConditionalGeneration, config, attn_implementation, seed)
    with torch.no_grad():
        for layer in model.vision_model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.normal_(0, 0.5)
        adapter = model.vision_model.vision_adapter.mlp
        for linear in (model.vision_model.patch_embedding.linear, adapter.fc1, adapter.fc2, model.multi_modal_projector.linear_1):
            linear.weight.normal_(0, linear.in_features ** -0.5)
    return model, processor


__all__ = ["LLAMA4_TOKENS", "tiny_llama4"]
