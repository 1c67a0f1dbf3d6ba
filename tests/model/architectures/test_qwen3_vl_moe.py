"""Qwen3-VL-MoE: Qwen3-VL (packed tower, deepstack, M-RoPE, q/k norms) whose LLM MLPs are sparse
mixtures of experts, except the `mlp_only_layers`. The family tier and Qwen3-VL's own tests run on
its fixtures; the tests below cover what the experts add: which layers route, the points each
MoE block has, exactness under every `_experts_implementation`, TL's weight convention, and the
specs and configs that are refused. (`tests/model/test_moe_hooks.py` holds the expert edits.)"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from mmlens import HookedMLLM
from mmlens.errors import UnsupportedModelError
from mmlens.model.architectures.qwen3_vl_moe import QWEN3_MOE_BLOCK, Qwen3VLMoe
from mmlens.model.runtime.moe import MoESpec
from mmlens.testing.families.qwen3_vl_moe import tiny_qwen3_vl_moe

import family_tier as tier
import test_qwen3_vl as qwen3
from family_tier import assert_bridge_aliases
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

# Qwen3-VL's tests (the tier with its deepstack versions, deepstack, q/k norms, the Qwen2-VL
# tower's), on this file's fixtures; the bridge-name test is this file's (the MLP names differ) and
# the refused-spec tests build Qwen3-VL models
_NOT_HERE = {"test_bridge_hook_names_are_aliases", "test_a_spec_without_the_qk_norms_is_refused",
             "test_more_deepstack_levels_than_llm_layers_are_refused"}
globals().update({name: test for name, test in vars(qwen3).items() if name.startswith("test_") and name not in _NOT_HERE})
family, eager, builder = tier.fixtures({"qwen3-vl-moe": lambda attn: tiny_qwen3_vl_moe(attn_implementation=attn)})
N_EXPERTS, TOP_K = 4, 2  # tiny_qwen3_vl_moe's defaults; layer 0 is dense, layers 1 and 2 route


def test_the_config_says_which_layers_route(eager):
    """`cfg.llm.moe` lists the layers Hugging Face built a sparse block for; those have the MoE
    points and no dense MLP points, the dense layer the reverse."""
    model = eager.model
    moe = model.cfg.llm.moe
    assert (moe.layers, moe.n_experts, moe.top_k, moe.d_expert) == ((1, 2), N_EXPERTS, TOP_K, 32)
    sparse = [l for l, layer in enumerate(eager.reference.model.language_model.layers) if hasattr(layer.mlp, "experts")]
    assert list(moe.layers) == sparse
    names = set(model.hook_names())
    assert {"blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_pre_linear", "blocks.0.mlp.hook_post"} <= names
    assert not any(n.startswith("blocks.0.mlp.hook_router") or ".experts." in n and n.startswith("blocks.0.") for n in names)
    for layer in moe.layers:
        assert f"blocks.{layer}.mlp.hook_pre" not in names
        assert {f"blocks.{layer}.mlp.hook_router_logits", f"blocks.{layer}.mlp.hook_expert_indices",
                f"blocks.{layer}.mlp.hook_expert_weights"} <= names
        assert {f"blocks.{layer}.mlp.experts.{e}.{point}" for e in range(N_EXPERTS)
                for point in ("hook_pre", "hook_pre_linear", "hook_post", "hook_out")} <= names


@torch.no_grad()
def test_routing_points_hold_hf_routing(eager):
    """The router logits are Hugging Face's router's, [batch, pos, n_experts]; the chosen experts and
    their weights are its top-k (renormalised: they sum to 1), bit for bit."""
    model, inputs = eager.model, eager.inputs
    names = ["blocks.1.ln2.hook_normalized", "blocks.1.mlp.hook_router_logits", "blocks.1.mlp.hook_expert_indices",
             "blocks.1.mlp.hook_expert_weights"]
    _, cache = model.run_with_cache(inputs, names_filter=names)
    batch, pos = inputs.input_ids.shape
    logits, weights, indices = eager.reference.model.language_model.layers[1].mlp.gate(cache[names[0]])
    assert cache[names[1]].shape == (batch, pos, N_EXPERTS)
    assert torch.equal(cache[names[1]].flatten(0, 1), logits)
    assert torch.equal(cache[names[2]].flatten(0, 1), indices)
    assert torch.equal(cache[names[3]].flatten(0, 1), weights)
    torch.testing.assert_close(cache[names[3]].sum(-1), torch.ones(batch, pos), atol=1e-6, rtol=0)
    assert len(set(indices.flatten().tolist())) == N_EXPERTS, "the tiny model's tokens use every expert"


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@torch.no_grad()
def test_every_experts_implementation_is_exact(implementation):
    """Hooks off run Hugging Face's own experts kernel bit for bit; every point hooked recomputes the
    eager maths, within 1e-5 of that kernel."""
    fresh = tier.build_family(lambda: tiny_qwen3_vl_moe(experts_implementation=implementation))
    model, inputs = fresh.model, fresh.inputs
    assert model.hf_model.model.language_model.layers[1].mlp.experts.config._experts_implementation == implementation
    theirs = fresh.reference(**inputs.hf_kwargs()).logits
    assert torch.equal(model(inputs), theirs)
    hooked = model.run_with_hooks(inputs, fwd_hooks=[(lambda name: True, lambda x, hook: x.clone())])
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(hooked[valid], theirs[valid], atol=1e-5, rtol=0)


def test_tl_weights_follow_tl_moe_convention(eager):
    """TL's MoE: `mlp.W_gate` is the router [d_model, n_experts], `mlp.experts[e]` a gated MLP
    (W_in up, W_gate gate, W_out down, views of the fused parameters); a dense `W_in` on an MoE
    block is refused by name, and the dense layer keeps its own."""
    model = eager.model
    hf_moe = model.hf_model.model.language_model.layers[1].mlp
    mlp = model.blocks[1].mlp
    assert torch.equal(mlp.W_gate, hf_moe.gate.weight.T)
    fused, width = hf_moe.experts.gate_up_proj[2], model.cfg.llm.moe.d_expert
    assert torch.equal(mlp.experts[2].W_gate, fused[:width].T) and torch.equal(mlp.experts[2].W_in, fused[width:].T)
    assert torch.equal(mlp.experts[2].W_out, hf_moe.experts.down_proj[2].T)
    assert mlp.experts[2].W_in.data_ptr() == fused[width:].data_ptr(), "a view: edits reach the model"
    x = torch.randn(5, model.cfg.d_model)
    expert = torch.nn.functional.silu(x @ mlp.experts[2].W_gate) * (x @ mlp.experts[2].W_in) @ mlp.experts[2].W_out
    gate, up = torch.nn.functional.linear(x, hf_moe.experts.gate_up_proj[2]).chunk(2, dim=-1)
    torch.testing.assert_close(expert, torch.nn.functional.linear(hf_moe.experts.act_fn(gate) * up,
                                                                   hf_moe.experts.down_proj[2]), atol=1e-6, rtol=0)
    assert torch.equal(mlp.b_out, torch.zeros(model.cfg.d_model))
    for name in ("W_in", "W_out", "b_in"):
        with pytest.raises(UnsupportedModelError, match=f"mixture of experts: it has no single `{name}`.*experts\\[e\\]"):
            getattr(mlp, name)
    assert model.blocks[0].mlp.W_in.shape == (model.cfg.d_model, model.cfg.d_mlp)


# the bridge's names on this stack: the router on sparse layers, dense_* projections on dense ones
BRIDGE_NAMES = {
    "blocks.1.mlp.gate.hook_out": "blocks.1.mlp.hook_router_logits",
    "blocks.2.mlp.gate.hook_expert_weights": "blocks.2.mlp.hook_expert_weights",
    "blocks.2.mlp.gate.hook_expert_indices": "blocks.2.mlp.hook_expert_indices",
    "blocks.0.mlp.dense_gate.hook_out": "blocks.0.mlp.hook_pre",
    "blocks.0.mlp.dense_in.hook_out": "blocks.0.mlp.hook_pre_linear",
    "blocks.0.mlp.dense_out.hook_in": "blocks.0.mlp.hook_post",
    "blocks.1.mlp.hook_out": "blocks.1.hook_mlp_out",
    "blocks.2.hook_out": "blocks.2.hook_resid_post",
    "vision_encoder.deepstack_mergers.1.hook_out": "adapter.deepstack.1.hook_out",
}
WITHHELD_BRIDGE_NAMES = qwen3.WITHHELD_BRIDGE_NAMES


def test_bridge_hook_names_are_aliases(eager):
    """TransformerBridge's MoE names resolve to ours; the plain LLM's `mlp.gate.hook_out` (a dense
    gate projection elsewhere) is the router here, and names no dense layer."""
    model, inputs = eager.model, eager.inputs
    assert_bridge_aliases(model, inputs, BRIDGE_NAMES)
    for name in ("blocks.0.mlp.gate.hook_out", "blocks.1.mlp.dense_gate.hook_out", *WITHHELD_BRIDGE_NAMES):
        with pytest.raises(Exception, match="unknown hook name"):
            model.resolve_hook_name(name)


def test_a_routing_the_spec_misreads_is_refused(builder, monkeypatch):
    """Forgetting the renormalisation of the top-k weights leaves plain logits exact; loading refuses
    it, naming the first MoE block."""
    hf_model, processor = builder()
    monkeypatch.setattr(Qwen3VLMoe, "llm_block", replace(QWEN3_MOE_BLOCK, moe=MoESpec(renormalize=False)))
    with pytest.raises(UnsupportedModelError, match=r"blocks\.1 .*does not match its block spec"):
        HookedMLLM.from_hf(hf_model, processor)


def test_a_spec_without_moe_or_a_config_that_disagrees_is_refused(builder, monkeypatch):
    """A block spec with no MoE spec, or a config marking a sparse layer dense, is refused at load
    naming the block's class, not run as a dense MLP."""
    hf_model, processor = builder()
    monkeypatch.setattr(Qwen3VLMoe, "llm_block", replace(QWEN3_MOE_BLOCK, moe=None))
    with pytest.raises(UnsupportedModelError, match="Qwen3VLMoeTextSparseMoeBlock: .*has no MoE spec"):
        HookedMLLM.from_hf(copy.deepcopy(hf_model), processor)
    monkeypatch.undo()
    real = Qwen3VLMoe.llm_config

    def one_layer_forgotten(tc):
        cfg = real(tc)
        return replace(cfg, moe=replace(cfg.moe, layers=cfg.moe.layers[:1]))

    monkeypatch.setattr(Qwen3VLMoe, "llm_config", staticmethod(one_layer_forgotten))
    with pytest.raises(UnsupportedModelError, match="Qwen3VLMoeTextSparseMoeBlock: .*marks its layer dense"):
        HookedMLLM.from_hf(hf_model, processor)
