"""A tiny Llama 3.2 Vision (tiled tower with a local and a gated global encoder, a linear projector,
an LLM whose cross-attention layers read the image features as keys and values) and its processor
without torchvision."""

from __future__ import annotations

import torch

from .common import instantiate, text_kwargs, word_tokenizer

MLLAMA_TOKENS = dict(image_token="<|image|>", python_token="<|python_tag|>")


def tiny_mllama(
    *,
    tile: int = 48,
    patch_size: int = 12,
    max_tiles: int = 4,
    vision_layers: int = 3,
    global_layers: int = 2,
    vision_d_model: int = 32,
    llm_layers: int = 4,
    cross_attention_layers: tuple[int, ...] = (1, 3),
    llm_d_model: int = 64,
    llm_heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "eager",
):
    """A tiny `MllamaForConditionalGeneration` and its `MllamaProcessor` (on
    `MllamaImageProcessorPil`, no chat template).

    Images become up to `max_tiles` tiles of `tile` pixels (4x4 patches of `patch_size` and a CLS
    token each): the test images (40x50, 32x32, 61x37) get 1x2, 1x1 and 2x1 tiles, padded to 4; the projector reads the global encoder's output concatenated with local layers 0
    and 2. LLM layers `cross_attention_layers` are cross-attention blocks, the others self-attention.
    The cross-attention gates are drawn away from their initial zero (which would make the
    cross-attention layers add nothing) and the tower's global gates stay at their init (pi / 4)."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tokenizer = word_tokenizer(**MLLAMA_TOKENS)
    image_processor = MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=max_tiles)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=None)
    text = text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, llm_heads // 2)
    text["vocab_size"] -= 8  # Mllama's embedding holds 8 tokens beyond vocab_size, the image token among them
    text["cross_attention_layers"] = list(cross_attention_layers)
    intermediate = [0, 2]
    vision = dict(hidden_size=vision_d_model, intermediate_size=4 * vision_d_model, num_hidden_layers=vision_layers,
                  num_global_layers=global_layers, attention_heads=4, image_size=tile, patch_size=patch_size,
                  max_num_tiles=max_tiles, intermediate_layers_indices=intermediate,
                  vision_output_dim=vision_d_model * (len(intermediate) + 1),
                  supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]])
    config = MllamaConfig(vision_config=vision, text_config=text, tie_word_embeddings=False,
                          image_token_index=tokenizer.convert_tokens_to_ids(MLLAMA_TOKENS["image_token"]))
    model = instantiate(MllamaForConditionalGeneration, config, attn_implementation, seed)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if hasattr(layer, "cross_attn"):
                layer.cross_attn_attn_gate.uniform_(0.5, 1.0)
                layer.cross_attn_mlp_gate.uniform_(0.5, 1.0)
        for embedding in (model.model.vision_model.pre_tile_positional_embedding,
                          model.model.vision_model.post_tile_positional_embedding):
            embedding.gate.fill_(0.5)
        model.model.vision_model.gated_positional_embedding.gate.fill_(0.5)
    return model, processor


__all__ = ["MLLAMA_TOKENS", "tiny_mllama"]
