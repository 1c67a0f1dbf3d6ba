"""The TransformerLens surface of a mixture-of-experts LLM (tiny Qwen3-VL-MoE: layer 0 dense, layers
1 and 2 routed): `tl_named_parameters` under TL's MoE names, neuron decompositions refused by name
on routed layers (no neuron basis spans the experts), and the expert points given by the hook tree
from `cfg.llm.moe` for any family that declares it."""

from __future__ import annotations

import pytest
import torch

import mmlens.model.hooked_mllm as hooked
from mmlens import HookedMLLM
from mmlens.errors import UnsupportedModelError
from mmlens.model.architectures.qwen3_vl import Qwen3VL
from mmlens.model.architectures.qwen3_vl_moe import QWEN3_MOE_BLOCK, Qwen3VLMoe
from mmlens.model.hook_tree import MoEHooks
from mmlens.testing.families.qwen3_vl_moe import tiny_qwen3_vl_moe

from conftest import random_images

N_EXPERTS, MOE_LAYERS = 4, (1, 2)


@pytest.fixture(scope="module")
def moe_model():
    model = HookedMLLM.from_hf(*tiny_qwen3_vl_moe())
    return model, model.prepare(random_images(2), ["what is in the image ?", "how many"])


def test_named_parameters_give_the_router_and_each_expert_under_tl_moe_names(moe_model):
    model, _ = moe_model
    params = dict(model.tl_named_parameters())
    hf_layers = model.hf_model.model.language_model.layers
    for layer in MOE_LAYERS:
        prefix = f"blocks.{layer}.mlp"
        assert not any(f"{prefix}.{w}" in params for w in ("W_in", "W_out", "b_in")), "no dense tensor on an MoE block"
        assert torch.equal(params[f"{prefix}.W_gate"], hf_layers[layer].mlp.gate.weight.T)
        experts = {name for name in params if name.startswith(f"{prefix}.experts.")}
        assert experts == {f"{prefix}.experts.{e}.{w}" for e in range(N_EXPERTS) for w in ("W_in", "W_gate", "W_out")}
        down = hf_layers[layer].mlp.experts.down_proj[3]
        assert params[f"{prefix}.experts.3.W_out"].data_ptr() == down.data_ptr(), "a view of the model's weight"
    assert params["blocks.0.mlp.W_in"].shape == (model.cfg.d_model, model.cfg.d_mlp)


@torch.no_grad()
def test_neuron_expansions_over_routed_layers_are_refused_and_the_unexpanded_one_sums(moe_model):
    model, inputs = moe_model
    _, cache = model.run_with_cache(inputs)
    top = model.cfg.n_layers
    refusal = "block 1's MLP is a mixture of experts.*no single neuron basis.*expand_neurons=False"
    with pytest.raises(UnsupportedModelError, match=refusal):
        cache.stack_neuron_results(top)
    with pytest.raises(UnsupportedModelError, match=refusal):
        cache.get_full_resid_decomposition(top, expand_neurons=True)
    assert cache.stack_neuron_results(1).shape[0] == model.cfg.d_mlp, "the dense layer 0 still expands"
    parts = cache.get_full_resid_decomposition(top, expand_neurons=False)
    torch.testing.assert_close(parts.sum(0), cache[f"blocks.{top - 1}.hook_resid_post"], atol=1e-4, rtol=1e-4)


def test_any_family_declaring_moe_in_its_config_gets_the_expert_points(monkeypatch):
    """A family that states its MoE layers (config) and MoE spec (block) and nothing else: the hook
    tree gives those blocks `MoEHooks` itself, and the model runs as Hugging Face does."""

    class DeclaresMoE(Qwen3VL):
        hf_class_names = ("Qwen3VLMoeForConditionalGeneration",)
        llm_block = QWEN3_MOE_BLOCK
        llm_config = staticmethod(Qwen3VLMoe.llm_config)

    monkeypatch.setattr(hooked, "architecture_for", lambda _model: DeclaresMoE())
    model = HookedMLLM.from_hf(*tiny_qwen3_vl_moe())
    assert [l for l, block in enumerate(model.blocks) if isinstance(block.mlp, MoEHooks)] == list(MOE_LAYERS)
    assert f"blocks.{MOE_LAYERS[0]}.mlp.experts.{N_EXPERTS - 1}.hook_out" in model.hook_names()
