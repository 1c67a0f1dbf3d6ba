"""What every tiny family builder shares: seeded instantiation, the word tokenizer with a family's image
tokens, and an LLM config sized for it."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from ...zoo.build import build_word_tokenizer


def instantiate(model_class, config, attn_implementation: str, seed: int):
    """`model_class(config)` with `attn_implementation`, its random weights drawn after seeding
    torch with `seed`, in eval mode."""
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return model_class(config).eval()


def word_tokenizer(**special_tokens: str) -> PreTrainedTokenizerFast:
    """The embedded model's word tokenizer (BOS added, left padding) with a family's image tokens
    added as special tokens (`boi_token="<start_of_image>"` ...)."""
    words = build_word_tokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=words.backend_tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens=special_tokens,
    )


def text_kwargs(tokenizer, d_model: int, layers: int, heads: int, kv_heads: int) -> dict:
    """A text config's sizes and special token ids for a tiny LLM over `tokenizer`."""
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
