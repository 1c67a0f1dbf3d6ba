"""GLM-4.5V (Glm4vMoeForConditionalGeneration): GLM-4V's tower, merger, layout and M-RoPE before a
GLM-4.5 mixture-of-experts LLM (a dense first layer, then DeepSeek-V3 routing: sigmoid scores, a
score-correction bias that only chooses, grouped top-k, renormalised weights times
routed_scaling_factor, an ungated shared expert). The family tier and GLM-4V's own checks run on
its fixtures; the tests below check the routing and expert points against Hugging Face's modules,
expert patching, and the specs that are refused."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from PIL import ImageOps

from mmlens import HookedMLLM
from mmlens.errors import UnsupportedModelError
from mmlens.interventions import TokenGroup, ablate_experts
from mmlens.model.architectures.glm4v import GLM4V_MOE, GLM4V_MOE_BLOCK, Glm4vMoe
from mmlens.testing.families.glm4v import tiny_glm4v_moe

import family_tier as tier
import test_glm4v as glm4v
from conftest import random_images
from family_tier import PROMPTS, assert_bridge_aliases
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures
from test_moe_hooks import _hf_zeroing, contribution

# GLM-4V's checks (with Qwen2-VL's) on this file's fixtures, but those of its dense LLM (the fused
# gate/up MLP, the sandwich norms, its bridge names)
_NOT_HERE = {"test_the_fused_gate_up_mlp_is_split_into_its_halves", "test_a_spec_without_the_sandwich_norms_is_refused",
             "test_bridge_hook_names_are_aliases"}
globals().update({name: test for name, test in vars(glm4v).items() if name.startswith("test_") and name not in _NOT_HERE})
family, eager, builder = tier.fixtures({"glm4.5v": lambda attn: tiny_glm4v_moe(attn_implementation=attn)})
N_EXPERTS, TOP_K, MOE_LAYER = 8, 2, 1  # tiny_glm4v_moe's defaults: layer 0 is dense, layer 1 routes


def _hf_block(eager, layer: int = MOE_LAYER) -> torch.nn.Module:
    return eager.reference.model.language_model.layers[layer].mlp


def test_the_first_layers_stay_dense(eager):
    """`cfg.llm.moe` lists the layers from `first_k_dense_replace` on, with the shared expert; the dense
    layer keeps its MLP points and the sparse one has the MoE points instead."""
    model = eager.model
    moe = model.cfg.llm.moe
    assert (moe.layers, moe.n_experts, moe.top_k, moe.d_expert, moe.shared_expert) == ((MOE_LAYER,), N_EXPERTS, TOP_K, 32, True)
    names = set(model.hook_names())
    assert {"blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_pre_linear", "blocks.0.mlp.hook_post"} <= names
    assert "blocks.1.mlp.hook_pre" not in names
    assert {f"blocks.1.mlp.{p}" for p in ("hook_router_logits", "hook_expert_indices", "hook_expert_weights")} <= names
    assert {f"blocks.1.mlp.shared_expert.{p}" for p in ("hook_pre", "hook_pre_linear", "hook_post", "hook_out")} <= names
    assert not any("hook_gate" in name for name in names if ".shared_expert." in name), "the shared expert is ungated"


@torch.no_grad()
def test_routing_points_hold_hf_routing(eager):
    """The router's float32 logits, its chosen experts (from the biased scores, within the best group)
    and their weights (unbiased scores, renormalised, times routed_scaling_factor) are Hugging Face's
    router's bit for bit; the bias and the groups change the choice on this model."""
    model, inputs = eager.model, eager.inputs
    mlp = f"blocks.{MOE_LAYER}.mlp."
    names = [f"blocks.{MOE_LAYER}.ln2.hook_normalized", mlp + "hook_router_logits", mlp + "hook_expert_indices",
             mlp + "hook_expert_weights"]
    _, cache = model.run_with_cache(inputs, names_filter=names)
    router = _hf_block(eager).gate
    logits, weights, indices = router(cache[names[0]])
    assert torch.equal(cache[names[1]].flatten(0, 1), logits) and logits.dtype == torch.float32
    assert torch.equal(cache[names[2]].flatten(0, 1), indices)
    assert torch.equal(cache[names[3]].flatten(0, 1), weights)
    valid = inputs.attention_mask.bool().flatten()
    torch.testing.assert_close(weights.sum(-1)[valid], torch.full((int(valid.sum()),), router.routed_scaling_factor))
    plain = torch.topk(logits.sigmoid(), TOP_K, dim=-1)[1]
    assert (plain.sort(-1).values != indices.sort(-1).values).any(), "the bias and groups choose other experts"
    group = indices // (N_EXPERTS // router.num_group)
    assert (group == group[:, :1]).all(), "each token's experts come from its one kept group"


@torch.no_grad()
def test_experts_and_the_shared_expert_sum_to_the_mlp_output(eager):
    """The routed experts' hook_out and the (ungated) shared expert's hook_out sum to hook_mlp_out bit
    for bit, which is Hugging Face's block's output; the shared expert's points are its projections."""
    model, inputs = eager.model, eager.inputs
    mlp = f"blocks.{MOE_LAYER}.mlp."
    _, cache = model.run_with_cache(inputs, names_filter=lambda name: name.startswith(mlp) or name in (
        f"blocks.{MOE_LAYER}.ln2.hook_normalized", f"blocks.{MOE_LAYER}.hook_mlp_out"))
    x, block = cache[f"blocks.{MOE_LAYER}.ln2.hook_normalized"], _hf_block(eager)
    routed = sum(cache[f"{mlp}experts.{e}.hook_out"] for e in range(N_EXPERTS))
    assert torch.equal(routed + cache[mlp + "shared_expert.hook_out"], cache[f"blocks.{MOE_LAYER}.hook_mlp_out"])
    assert torch.equal(cache[mlp + "shared_expert.hook_pre"], block.shared_experts.gate_proj(x))
    torch.testing.assert_close(cache[mlp + "shared_expert.hook_out"], block.shared_experts(x), atol=1e-7, rtol=0)
    torch.testing.assert_close(block(x), cache[f"blocks.{MOE_LAYER}.hook_mlp_out"], atol=1e-6, rtol=0)


@torch.no_grad()
def test_patching_one_expert_equals_a_hand_hook_on_hf(eager):
    """Expert 3's hook_out patched from the clean run into the mirrored one equals Hugging Face's
    mirrored run with a forward hook on the experts module swapping expert 3's contribution (written
    out from its fused weights and the router's choice) for the clean one."""
    model, clean = eager.model, eager.inputs
    corrupt = model.prepare([ImageOps.mirror(image) for image in random_images(3)], PROMPTS)
    name = f"blocks.{MOE_LAYER}.mlp.experts.3.hook_out"
    _, cache = model.run_with_cache(clean, names_filter=name)
    patched = model.run_with_hooks(corrupt, fwd_hooks=[(name, lambda x, hook: cache[name])])
    experts, kept = _hf_block(eager).experts, {}

    def hf_logits(inputs, hook):
        handle = experts.register_forward_hook(hook)
        try:
            return eager.reference(**inputs.hf_kwargs()).logits
        finally:
            handle.remove()

    hf_logits(clean, lambda module, args, out: kept.__setitem__("clean", contribution(module, *args, expert=3)))
    theirs = hf_logits(corrupt, lambda module, args, out: out - contribution(module, *args, expert=3) + kept["clean"])
    valid = clean.attention_mask.bool()
    assert (patched - theirs)[valid].abs().max() < 1e-6
    assert (patched - model(corrupt))[valid].abs().max() > 1e-4, "the patch changed something"


@pytest.mark.parametrize("renormalize", [False, True])
@torch.no_grad()
def test_expert_ablation_equals_a_hand_made_hf_edit(eager, renormalize):
    """`ablate_experts` of experts 3 and 6 (one in each group) at the image tokens equals Hugging Face
    with their routing weights zeroed there (the others kept, or rescaled to the routed_scaling_factor
    sum they had); the shared expert is untouched."""
    model, inputs = eager.model, eager.inputs
    ablation = ablate_experts(model, inputs, {MOE_LAYER: [3, 6]}, positions=TokenGroup.image(), renormalize=renormalize)
    with ablation:
        ours = model(inputs)
    image = TokenGroup.image().resolve(inputs).flatten()
    handles = [_hf_block(eager).experts.register_forward_pre_hook(_hf_zeroing(e, image, renormalize)) for e in (3, 6)]
    try:
        theirs = eager.reference(**inputs.hf_kwargs()).logits
    finally:
        for handle in handles:
            handle.remove()
    valid = inputs.attention_mask.bool()
    assert (ours - theirs)[valid].abs().max() < 1e-6
    assert ablation.ablated[MOE_LAYER] > 0 and (ours - model(inputs))[valid].abs().max() > 1e-4


@pytest.mark.parametrize("version, implementation", [("4.6v", "eager"), ("4.5v", "grouped_mm"), ("4.5v", "batched_mm")])
@torch.no_grad()
def test_glm46v_and_every_experts_implementation_are_exact(version, implementation):
    """GLM-4.6V's class holding GLM-4.5V's MoE LLM loads as this family, and Hugging Face's fused
    experts kernels run under it: hooks off are bit-identical, every point hooked within 1e-5."""
    fresh = tier.build_family(lambda: tiny_glm4v_moe(version, experts_implementation=implementation))
    model, inputs = fresh.model, fresh.inputs
    assert type(model.architecture) is Glm4vMoe
    theirs = fresh.reference(**inputs.hf_kwargs()).logits
    assert torch.equal(model(inputs), theirs)
    hooked = model.run_with_hooks(inputs, fwd_hooks=[(lambda name: True, lambda x, hook: x.clone())])
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(hooked[valid], theirs[valid], atol=1e-5, rtol=0)


@torch.no_grad()
def test_the_router_runs_in_float32_in_a_bfloat16_model(builder):
    """In bfloat16 the router's logits are still float32 (Hugging Face's cast), so the hooked routing
    chooses and weighs Hugging Face's experts bit for bit."""
    hf_model, processor = builder()
    hf_model = hf_model.to(torch.bfloat16)
    reference = copy.deepcopy(hf_model)
    model = HookedMLLM.from_hf(hf_model, processor)
    inputs = model.prepare(random_images(3), PROMPTS)
    mlp = f"blocks.{MOE_LAYER}.mlp."
    names = [f"blocks.{MOE_LAYER}.ln2.hook_normalized", mlp + "hook_router_logits", mlp + "hook_expert_indices",
             mlp + "hook_expert_weights"]
    _, cache = model.run_with_cache(inputs, names_filter=names)
    logits, weights, indices = reference.model.language_model.layers[MOE_LAYER].mlp.gate(cache[names[0]])
    assert cache[names[1]].dtype == torch.float32 and torch.equal(cache[names[1]].flatten(0, 1), logits)
    assert torch.equal(cache[names[2]].flatten(0, 1), indices) and torch.equal(cache[names[3]].flatten(0, 1), weights)


@pytest.mark.parametrize("misread", [
    dict(choice_bias=None), dict(groups=None), dict(routed_scale=None),
], ids=["no-bias", "no-groups", "no-scale"])
def test_a_routing_the_spec_does_not_name_is_refused(builder, monkeypatch, misread):
    """A spec that does not name the score-correction bias, the expert groups or the routed scaling
    factor is refused at load naming the router's setting, not run with another routing."""
    hf_model, processor = builder()
    monkeypatch.setattr(Glm4vMoe, "llm_block", replace(GLM4V_MOE_BLOCK, moe=replace(GLM4V_MOE, **misread)))
    setting = {"choice_bias": "e_score_correction_bias", "groups": "num_group", "routed_scale": "routed_scaling_factor"}
    with pytest.raises(UnsupportedModelError, match=f"Glm4vMoeTextMoE: its router .*{setting[next(iter(misread))]}"):
        HookedMLLM.from_hf(hf_model, processor)


def test_a_spec_that_misreads_the_weights_is_refused(builder, monkeypatch):
    """Forgetting the renormalisation leaves plain logits exact: the router's own `norm_topk_prob` refuses
    the spec by name at load; a misreading no router setting names is left to the load check, which
    refuses it naming the block."""
    hf_model, processor = builder()
    monkeypatch.setattr(Glm4vMoe, "llm_block", replace(GLM4V_MOE_BLOCK, moe=replace(GLM4V_MOE, renormalize=False)))
    with pytest.raises(UnsupportedModelError, match="norm_topk_prob=True but its MoESpec says renormalize=False"):
        HookedMLLM.from_hf(hf_model, processor)
    monkeypatch.setattr(Glm4vMoe, "llm_block", replace(GLM4V_MOE_BLOCK, moe=replace(GLM4V_MOE, weights_on="input")))
    with pytest.raises(UnsupportedModelError, match=rf"blocks\.{MOE_LAYER} .*does not match its block spec"):
        HookedMLLM.from_hf(*builder())


def test_unnormalised_top_k_weights_are_refused_by_name():
    hf_model, processor = tiny_glm4v_moe()
    hf_model.config.text_config.norm_topk_prob = False
    with pytest.raises(UnsupportedModelError, match="norm_topk_prob=False"):
        HookedMLLM.from_hf(hf_model, processor)


# GLM-4V's bridge names for the tower's merger, GLM-4.5-MoE's for the LLM (TL 4.3 wraps both, not this class)
BRIDGE_NAMES = {
    "vision_projector.hook_in": "adapter.hook_hidden",
    "vision_projector.hook_out": "adapter.hook_out",
    "blocks.1.mlp.gate.hook_out": "blocks.1.mlp.hook_router_logits",
    "blocks.1.mlp.gate.hook_expert_weights": "blocks.1.mlp.hook_expert_weights",
    "blocks.1.mlp.gate.hook_expert_indices": "blocks.1.mlp.hook_expert_indices",
    "blocks.0.mlp.dense_gate.hook_out": "blocks.0.mlp.hook_pre",
    "blocks.0.mlp.dense_in.hook_out": "blocks.0.mlp.hook_pre_linear",
    "blocks.0.mlp.dense_out.hook_in": "blocks.0.mlp.hook_post",
    "blocks.1.mlp.hook_out": "blocks.1.hook_mlp_out",
    "blocks.0.attn.hook_out": "blocks.0.hook_attn_out",
}


def test_bridge_hook_names_are_aliases(eager):
    model, inputs = eager.model, eager.inputs
    assert_bridge_aliases(model, inputs, BRIDGE_NAMES)
    for name in ("blocks.0.mlp.gate.hook_out", "blocks.1.mlp.dense_gate.hook_out", "blocks.0.ln1_post.hook_out"):
        with pytest.raises(Exception, match="unknown hook name"):
            model.resolve_hook_name(name)
