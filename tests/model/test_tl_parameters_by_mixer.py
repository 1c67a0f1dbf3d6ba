"""`tl_named_parameters` on blocks whose token mixer is not self-attention: a cross-attention block
(Mllama) lists its attention weights under `cross_attn`, a linear-attention block (Qwen3.5) lists
none (TL has no names for a gated delta net), and neither stops the listing."""

from __future__ import annotations

import torch

from mmlens import HookedMLLM
from mmlens.testing.families.mllama import tiny_mllama
from mmlens.testing.families.qwen3_5 import tiny_qwen3_5


def test_cross_attention_blocks_list_their_weights_under_cross_attn():
    model = HookedMLLM.from_hf(*tiny_mllama())
    names = dict(model.tl_named_parameters())
    for layer in range(model.cfg.llm.n_layers):
        cross = layer in model.cfg.llm.cross_attention_layers
        assert (f"blocks.{layer}.cross_attn.W_Q" in names) == cross
        assert (f"blocks.{layer}.attn.W_Q" in names) == (not cross)
    layer = model.cfg.llm.cross_attention_layers[0]
    torch.testing.assert_close(names[f"blocks.{layer}.cross_attn.W_Q"], model.blocks[layer].cross_attn.W_Q, rtol=0, atol=0)
    assert "unembed.W_U" in names, "the listing reaches the end"


def test_linear_attention_blocks_list_no_attention_weights():
    model = HookedMLLM.from_hf(*tiny_qwen3_5())
    names = [name for name, _ in model.tl_named_parameters()]
    linear = model.cfg.llm.linear_attention_layers
    assert linear, "the tiny Qwen3.5 has linear-attention layers"
    for layer in range(model.cfg.llm.n_layers):
        has_attention = any(name.startswith(f"blocks.{layer}.attn.") for name in names)
        assert has_attention == (layer not in linear)
        assert f"blocks.{layer}.mlp.W_in" in names
    assert names[-1] == "unembed.b_U"
