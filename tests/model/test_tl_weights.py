"""The TL weight surface reproduces each cached activation from the one before it, on every stage,
and the norms' hook_scale / callable forms make apply_ln paths exact."""

from __future__ import annotations

import einops
import pytest
import torch
from transformer_lens.FactoredMatrix import FactoredMatrix

STAGES = ("llm", "vision")


def _prefix(stage: str) -> str:
    return "vision." if stage == "vision" else ""


def _blocks(model, stage):
    return model.vision.blocks if stage == "vision" else model.blocks


@pytest.fixture(scope="module")
def cached(tiny):
    with torch.no_grad():
        logits, cache = tiny.model.run_with_cache(tiny.inputs)
    return tiny.model, logits, cache


@pytest.mark.parametrize("stage", STAGES)
@torch.no_grad()
def test_attention_weights_reproduce_q_k_v_and_attn_out(cached, stage):
    model, _, cache = cached
    p = _prefix(stage)
    attn = _blocks(model, stage)[1].attn
    x = cache[f"{p}blocks.1.ln1.hook_normalized"]
    q = einops.einsum(x, attn.W_Q, "b s m, h m d -> b s h d") + attn.b_Q
    torch.testing.assert_close(q, cache[f"{p}blocks.1.attn.hook_q"], atol=1e-5, rtol=0)
    k = einops.einsum(x, attn._W_K, "b s m, h m d -> b s h d") + attn._b_K
    torch.testing.assert_close(k, cache[f"{p}blocks.1.attn.hook_k"], atol=1e-5, rtol=0)
    v = einops.einsum(x, attn._W_V, "b s m, h m d -> b s h d") + attn._b_V
    torch.testing.assert_close(v, cache[f"{p}blocks.1.attn.hook_v"], atol=1e-5, rtol=0)
    # TL expands grouped kv heads: query head h reads kv head h // repeat
    assert attn.W_K.shape == attn.W_Q.shape
    torch.testing.assert_close(attn.W_K[-1], attn._W_K[-1])
    z = cache[f"{p}blocks.1.attn.hook_z"]
    out = einops.einsum(z, attn.W_O, "b s h d, h d m -> b s m") + attn.b_O
    torch.testing.assert_close(out, cache[f"{p}blocks.1.hook_attn_out"], atol=1e-5, rtol=0)


@torch.no_grad()
def test_factored_qk_gives_the_attention_scores(cached):
    model, _, cache = cached
    attn = model.vision.blocks[0].attn  # no rotary: scores are x W_Q W_K^T x^T (+ biases)
    x = cache["vision.blocks.0.ln1.hook_normalized"][0]
    q = x @ attn.W_Q + attn.b_Q[:, None]
    k = x @ attn.W_K + attn.b_K[:, None]
    scores = q @ k.transpose(-1, -2) / attn.W_Q.shape[-1] ** 0.5
    torch.testing.assert_close(scores, cache["vision.blocks.0.attn.hook_attn_scores"][0], atol=1e-4, rtol=0)
    assert isinstance(attn.QK, FactoredMatrix) and isinstance(model.OV, FactoredMatrix)
    torch.testing.assert_close(attn.QK.AB, attn.W_Q @ attn.W_K.transpose(-1, -2))
    assert model.QK.shape == (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_model)


@pytest.mark.parametrize("stage", STAGES)
@torch.no_grad()
def test_mlp_weights_reproduce_mlp_out(cached, stage):
    model, _, cache = cached
    p = _prefix(stage)
    block = _blocks(model, stage)[0]
    x = cache[f"{p}blocks.0.ln2.hook_normalized"]
    post = cache[f"{p}blocks.0.mlp.hook_post"]
    if stage == "llm":
        torch.testing.assert_close(x @ block.mlp.W_gate, cache["blocks.0.mlp.hook_pre"], atol=1e-5, rtol=0)
        torch.testing.assert_close(x @ block.mlp.W_in, cache["blocks.0.mlp.hook_pre_linear"], atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(x @ block.mlp.W_in + block.mlp.b_in, cache[f"{p}blocks.0.mlp.hook_pre"], atol=1e-5, rtol=0)
    out = post @ block.mlp.W_out + block.mlp.b_out
    torch.testing.assert_close(out, cache[f"{p}blocks.0.hook_mlp_out"], atol=1e-5, rtol=0)


@torch.no_grad()
def test_stacked_weights_and_embeddings_have_tl_shapes(cached):
    model, _, cache = cached
    cfg = model.cfg
    assert model.W_Q.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head)
    assert model.W_O.shape == (cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model)
    assert model.W_in.shape == (cfg.n_layers, cfg.d_model, cfg.d_mlp)
    assert model.W_out.shape == (cfg.n_layers, cfg.d_mlp, cfg.d_model)
    assert model.W_U.shape == (cfg.d_model, cfg.d_vocab) and model.b_U.shape == (cfg.d_vocab,)
    v = cfg.vision
    assert model.vision.W_V.shape == (v.n_layers, v.n_heads, v.d_model, v.d_head)
    ids = torch.tensor([[1, 5, 7]])
    torch.testing.assert_close(model.embed(ids), model.W_E[ids])
    # the weights are views: the model's own parameters, not copies
    assert model.blocks[0].attn.W_Q.data_ptr() == model.hf_model.model.language_model.layers[0].self_attn.q_proj.weight.data_ptr()


@torch.no_grad()
def test_final_norm_is_callable_and_unembed_gives_the_logits(cached):
    model, logits, cache = cached
    normed = model.ln_final(cache["resid_post", -1])
    assert torch.equal(normed, cache["ln_final.hook_normalized"])
    # the final norm before its weight (TL's fold_ln): the folded W_U and unembed take it to the logits
    torch.testing.assert_close(model.unembed(normed), logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(normed @ model.W_U + model.b_U, logits, atol=1e-5, rtol=0)
    assert torch.equal(model.blocks[1].ln2(cache["resid_mid", 1]), cache["blocks.1.ln2.hook_normalized"])


@torch.no_grad()
def test_hook_scale_is_the_norm_divisor_and_editing_it_rescales(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.endswith(("ln1.hook_scale", "hook_resid_pre", "ln1.hook_normalized")))
    for p, kind in (("", "RMS"), ("vision.", "LN")):
        x, scale = cache[f"{p}blocks.1.hook_resid_pre"], cache[f"{p}blocks.1.ln1.hook_scale"]
        norm = (model.vision.blocks if p else model.blocks)[1].ln1
        centred = x - x.mean(-1, keepdim=True) if kind == "LN" else x
        torch.testing.assert_close(centred / scale * norm.w + norm.b * (kind == "LN"), cache[f"{p}blocks.1.ln1.hook_normalized"], atol=1e-5, rtol=0)
    seen = {}
    model.run_with_hooks(inputs, return_type=None, fwd_hooks=[
        ("blocks.1.ln1.hook_scale", lambda s, hook: s * 2),
        ("blocks.1.ln1.hook_normalized", lambda x, hook: seen.setdefault("x", x)),
    ])
    torch.testing.assert_close(seen["x"], cache["blocks.1.ln1.hook_normalized"] / 2, atol=1e-6, rtol=0)
    untouched = model.run_with_hooks(inputs, fwd_hooks=[("blocks.1.ln1.hook_scale", lambda s, hook: s.clone())])
    assert torch.equal(untouched, model(inputs)), "an unedited scale leaves the output bit-identical"
