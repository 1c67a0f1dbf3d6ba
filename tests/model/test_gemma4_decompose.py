"""Gemma 4's block scalar (`layer_scalar`: `hook_resid_post = s * (resid_mid + mlp_out)`) in the
residual decompositions: every term is carried through the scalars of the blocks it passes, so the
components sum to the cached residual; and Gemma 4's TL weight surface (the tower's wrapped MLP
linears, stacked LLM weights refused where head sizes differ per layer type)."""

from __future__ import annotations

import pytest
import torch

from mmlens import HookedMLLM
from mmlens.errors import UnsupportedModelError
from mmlens.testing.families.gemma4 import tiny_gemma4

from conftest import random_images

PROMPTS = ["<|image|> what is in the image ?", "<|image|> how many"]
TOLERANCE = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def cached():
    model = HookedMLLM.from_hf(*tiny_gemma4())
    inputs = model.prepare(random_images(2), PROMPTS)
    _, cache = model.run_with_cache(inputs)
    scalars = [float(layer.layer_scalar) for layer in model.hf_model.model.language_model.layers]
    assert all(abs(s - 1) > 0.05 for s in scalars), "the builder draws scalars away from one"
    return model, cache


@torch.no_grad()
@pytest.mark.parametrize("layer, mlp_input, target", [(3, False, "blocks.2.hook_resid_post"),
                                                      (2, False, "blocks.2.hook_resid_pre"),
                                                      (2, True, "blocks.2.hook_resid_mid")])
def test_decompositions_sum_to_the_cached_residual(cached, layer, mlp_input, target):
    model, cache = cached
    residual = cache[target]
    torch.testing.assert_close(cache.decompose_resid(layer, mlp_input=mlp_input).sum(0), residual, **TOLERANCE)
    for expand in (False, True):
        full = cache.get_full_resid_decomposition(layer, mlp_input=mlp_input, expand_neurons=expand)
        torch.testing.assert_close(full.sum(0), residual, **TOLERANCE)


@torch.no_grad()
def test_each_term_carries_the_scalars_of_the_blocks_it_passed(cached):
    model, cache = cached
    s = [layer.layer_scalar for layer in model.hf_model.model.language_model.layers]
    parts, labels = cache.decompose_resid(3, return_labels=True)
    torch.testing.assert_close(parts[labels.index("embed")], cache["hook_multimodal_embed"] * s[0] * s[1] * s[2])
    torch.testing.assert_close(parts[labels.index("1_mlp_out")], cache["blocks.1.hook_mlp_out"] * s[1] * s[2])
    full, full_labels = cache.get_full_resid_decomposition(3, return_labels=True)
    neurons = torch.stack([full[full_labels.index(f"L1N{n}")] for n in range(model.cfg.d_mlp)])
    torch.testing.assert_close(cache.stack_neuron_results(3)[model.cfg.d_mlp : 2 * model.cfg.d_mlp], neurons)
    # Gemma's attention has no biases: the heads of blocks 0 and 1 make up their carried attn_out
    heads = cache.stack_head_results(2)
    torch.testing.assert_close(heads.sum(0), cache.decompose_resid(2, mode="attn", incl_embeds=False).sum(0), **TOLERANCE)


@torch.no_grad()
def test_accumulated_resid_is_the_cached_residual(cached):
    model, cache = cached
    stack = cache.accumulated_resid()
    for layer in range(model.cfg.n_layers):
        assert torch.equal(stack[layer], cache[f"blocks.{layer}.hook_resid_pre"])
    assert torch.equal(stack[-1], cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"])


def test_the_towers_wrapped_mlp_linears_are_its_tl_weights(cached):
    model, _ = cached
    mlp = model.hf_model.model.vision_tower.encoder.layers[1].mlp
    ours = model.vision.blocks[1].mlp
    assert torch.equal(ours.W_in, mlp.up_proj.linear.weight.T) and torch.equal(ours.W_gate, mlp.gate_proj.linear.weight.T)
    assert torch.equal(ours.W_out, mlp.down_proj.linear.weight.T)
    assert ours.W_in.data_ptr() == mlp.up_proj.linear.weight.data_ptr(), "a view: edits reach the model"
    assert model.vision.W_in.shape == (model.cfg.vision.n_layers, model.cfg.vision.d_model, model.cfg.vision.d_mlp)


def test_stacked_llm_attention_weights_are_refused_naming_the_per_layer_route(cached):
    model, _ = cached
    types = model.hf_model.config.text_config.layer_types
    full, sliding = types.index("full_attention"), types.index("sliding_attention")
    assert model.blocks[full].attn.W_Q.shape[-1] != model.blocks[sliding].attn.W_Q.shape[-1]
    for name in ("W_Q", "W_O"):
        with pytest.raises(UnsupportedModelError, match=rf"stacked `{name}`.*own sizes.*model\.blocks\[l\]"):
            getattr(model, name)
    assert model.W_in.shape[0] == model.cfg.n_layers, "what is the same size in every layer still stacks"


@pytest.fixture(scope="module")
def per_layer_cached():
    """An E2B-style model: per-layer inputs in every block, the last two reusing keys, double-wide MLPs."""
    model = HookedMLLM.from_hf(*tiny_gemma4(llm_layers=5, per_layer_input=8, kv_shared_layers=2, double_wide_mlp=True))
    inputs = model.prepare(random_images(2), PROMPTS)
    _, cache = model.run_with_cache(inputs)
    return model, cache


@torch.no_grad()
@pytest.mark.parametrize("layer, mlp_input, target", [(5, False, "blocks.4.hook_resid_post"),
                                                      (4, True, "blocks.4.hook_resid_mid")])
def test_per_layer_inputs_are_components_carried_through_the_scalars(per_layer_cached, layer, mlp_input, target):
    """What each block's per-layer input adds after its MLP is a component of its own (`{l}_per_layer`,
    its `hook_per_layer_out` times the scalars of the blocks it passed, its own included); with it the
    decompositions sum to the cached residual, neurons of the double-wide MLPs included."""
    model, cache = per_layer_cached
    parts, labels = cache.decompose_resid(layer, mlp_input=mlp_input, return_labels=True)
    torch.testing.assert_close(parts.sum(0), cache[target], **TOLERANCE)
    assert [l for l in labels if l.endswith("_per_layer")] == [f"{l}_per_layer" for l in range(layer)]
    s = [block.layer_scalar for block in model.hf_model.model.language_model.layers]
    carried = cache["blocks.2.hook_per_layer_out"] * torch.stack(s[2:layer]).prod()
    torch.testing.assert_close(parts[labels.index("2_per_layer")], carried)
    for expand in (False, True):
        full, full_labels = cache.get_full_resid_decomposition(layer, mlp_input=mlp_input, expand_neurons=expand,
                                                               return_labels=True)
        assert len(full_labels) == full.shape[0] and "3_per_layer" in full_labels
        torch.testing.assert_close(full.sum(0), cache[target], **TOLERANCE)
