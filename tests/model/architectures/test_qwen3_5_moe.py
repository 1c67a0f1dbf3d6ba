"""Qwen3.5-MoE: Qwen3.5 (hybrid linear / gated full attention, Qwen3-VL's tower) whose every LLM
MLP is a sparse mixture of experts beside a shared expert scaled by a sigmoid gate. The family
tier and Qwen3.5's own tests run on its fixtures (layers full, linear, linear, full); the tests
below check the MoE points against Hugging Face's modules on this family, on linear-attention
and full-attention layers alike: the router, the chosen experts, each expert, the shared expert
and its gate, expert patching and ablation, and the specs that are refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import ImageOps

from mmlens import HookedMLLM
from mmlens.errors import UnsupportedModelError
from mmlens.interventions import TokenGroup, ablate_experts, expert_sweep, logit_difference
from mmlens.model.architectures.qwen3_5_moe import QWEN3_5_MOE_BLOCK, Qwen3_5Moe
from mmlens.model.runtime.moe import MoESpec
from mmlens.testing.families.qwen3_5_moe import tiny_qwen3_5_moe

import family_tier as tier
import test_qwen3_5 as qwen3_5
from conftest import random_images
from family_tier import PROMPTS, assert_bridge_aliases
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures
from test_moe_hooks import _hf_zeroing, contribution

# Qwen3.5's tests on this file's fixtures, but those that patch Qwen3_5's own spec or build a dense
# Qwen3.5, and the bridge-name test (the MLP names differ)
_NOT_HERE = {"test_a_spec_without_rotary_is_refused", "test_a_spec_without_the_output_gate_is_refused_naming_the_gate",
             "test_a_hooked_forward_that_fails_names_its_block", "test_unknown_layer_types_are_refused",
             "test_bridge_hook_names_are_aliases"}
globals().update({name: test for name, test in vars(qwen3_5).items() if name.startswith("test_") and name not in _NOT_HERE})
family, eager, builder = tier.fixtures({"qwen3.5-moe": lambda attn: tiny_qwen3_5_moe(attn_implementation=attn)})
N_EXPERTS, TOP_K, LAYERS = 4, 2, (0, 1, 2, 3)  # tiny_qwen3_5_moe's defaults: every layer routes
LINEAR_LAYER, FULL_LAYER = 1, 3
METRIC = logit_difference(answer=5, wrong=6)


@pytest.fixture(scope="module")
def corrupt(eager):
    """The eager batch's images mirrored: the same sizes, so the same layout."""
    return eager.model.prepare([ImageOps.mirror(image) for image in random_images(3)], PROMPTS)


def _hf_logits(eager, inputs, hooks: list[tuple[torch.nn.Module, object]]) -> torch.Tensor:
    """Hugging Face's logits on `inputs` with forward hooks (module, hook) registered."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            return eager.reference(**inputs.hf_kwargs()).logits
    finally:
        for handle in handles:
            handle.remove()


def _hf_block(eager, layer: int) -> torch.nn.Module:
    return eager.reference.model.language_model.layers[layer].mlp


def test_every_layer_routes_beside_a_gated_shared_expert(eager):
    """Every layer, linear or full attention, is an MoE block with a shared expert and its gate;
    `d_mlp` is an expert's width (TL's MoE convention) and no dense MLP point exists."""
    model = eager.model
    moe = model.cfg.llm.moe
    assert (moe.layers, moe.n_experts, moe.top_k, moe.d_expert, moe.shared_expert) == (LAYERS, N_EXPERTS, TOP_K, 32, True)
    assert model.cfg.d_mlp == 32
    names = set(model.hook_names())
    for layer in LAYERS:
        mlp = f"blocks.{layer}.mlp."
        assert mlp + "hook_pre" not in names
        assert {mlp + p for p in ("hook_router_logits", "hook_expert_indices", "hook_expert_weights")} <= names
        shared_points = ("hook_pre", "hook_pre_linear", "hook_post", "hook_out", "hook_gate_logit", "hook_gate", "hook_gated_out")
        assert {f"{mlp}shared_expert.{p}" for p in shared_points} <= names
        assert {f"{mlp}experts.{e}.hook_out" for e in range(N_EXPERTS)} <= names


@pytest.mark.parametrize("layer", [LINEAR_LAYER, FULL_LAYER])
@torch.no_grad()
def test_moe_points_hold_hf_values(eager, layer):
    """On the block's own input: the routing points are HF's router's outputs bit for bit; the
    shared expert's points are its projections, its `hook_out` its output before the gate (TL's
    meaning), `hook_gate_logit` `shared_expert_gate`'s output, `hook_gate` its sigmoid and
    `hook_gated_out` their product; the experts' `hook_out` and the shared `hook_gated_out` sum to
    the MoE output bit for bit, which is HF's block's."""
    model, inputs = eager.model, eager.inputs
    mlp = f"blocks.{layer}.mlp."
    _, cache = model.run_with_cache(inputs, names_filter=lambda name: name.startswith(mlp) or name in (
        f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"))
    x, block = cache[f"blocks.{layer}.ln2.hook_normalized"], _hf_block(eager, layer)
    logits, weights, indices = block.gate(x)
    assert torch.equal(cache[mlp + "hook_router_logits"].flatten(0, 1), logits)
    assert torch.equal(cache[mlp + "hook_expert_indices"].flatten(0, 1), indices)
    assert torch.equal(cache[mlp + "hook_expert_weights"].flatten(0, 1), weights)
    shared = mlp + "shared_expert."
    assert torch.equal(cache[shared + "hook_pre"], block.shared_expert.gate_proj(x))
    assert torch.equal(cache[shared + "hook_pre_linear"], block.shared_expert.up_proj(x))
    assert torch.equal(cache[shared + "hook_gate_logit"], block.shared_expert_gate(x))
    assert torch.equal(cache[shared + "hook_gate"], torch.sigmoid(block.shared_expert_gate(x)))
    assert cache[shared + "hook_gate"].shape == cache[shared + "hook_gate_logit"].shape == (*x.shape[:2], 1)
    torch.testing.assert_close(cache[shared + "hook_out"], block.shared_expert(x), atol=1e-7, rtol=0)
    assert torch.equal(cache[shared + "hook_gated_out"], cache[shared + "hook_gate"] * cache[shared + "hook_out"])
    assert (cache[shared + "hook_gated_out"] - cache[shared + "hook_out"]).abs().max() > 1e-4, "the gate scales"
    routed = sum(cache[f"{mlp}experts.{e}.hook_out"] for e in range(N_EXPERTS))
    assert torch.equal(routed + cache[shared + "hook_gated_out"], cache[f"blocks.{layer}.hook_mlp_out"])
    torch.testing.assert_close(block(x), cache[f"blocks.{layer}.hook_mlp_out"], atol=1e-7, rtol=0)


@torch.no_grad()
def test_patching_one_expert_equals_a_hand_hook_on_hf(eager, corrupt):
    """Every expert point cached with its documented shape; expert 2's hook_out of a linear-attention
    layer patched from the clean run into the mirrored one equals HF's mirrored run with a forward
    hook on that layer's experts module swapping expert 2's contribution for the clean one."""
    model, clean = eager.model, eager.inputs
    _, cache = model.run_with_cache(clean, names_filter=lambda name: ".experts." in name or "expert_indices" in name)
    batch, pos = clean.input_ids.shape
    for layer in LAYERS:
        indices = cache[f"blocks.{layer}.mlp.hook_expert_indices"]
        for e in range(N_EXPERTS):
            served = int((indices == e).sum())
            assert cache[f"blocks.{layer}.mlp.experts.{e}.hook_post"].shape == (served, 32)
            assert cache[f"blocks.{layer}.mlp.experts.{e}.hook_out"].shape == (batch, pos, model.cfg.d_model)
    name = f"blocks.{LINEAR_LAYER}.mlp.experts.2.hook_out"
    patched = model.run_with_hooks(corrupt, fwd_hooks=[(name, lambda x, hook: cache[name])])
    experts, kept = _hf_block(eager, LINEAR_LAYER).experts, {}
    _hf_logits(eager, clean, [(experts, lambda module, args, out: kept.__setitem__("clean", contribution(module, *args, expert=2)))])
    theirs = _hf_logits(eager, corrupt, [(experts, lambda module, args, out: out - contribution(module, *args, expert=2) + kept["clean"])])
    valid = clean.attention_mask.bool()
    assert (patched - theirs)[valid].abs().max() < 1e-6
    assert (patched - model(corrupt))[valid].abs().max() > 1e-4, "the patch changed something"


@torch.no_grad()
def test_the_shared_expert_and_its_gate_edited_equal_hand_hooks_on_hf(eager, corrupt):
    """Closing the shared expert's gate (hook_gate to 0, or hook_gate_logit to -inf) equals HF with
    its gate logit at -inf; patching the shared expert's hook_gated_out from the clean run equals
    HF's mirrored run with the shared expert's and its gate's outputs swapped for the clean ones,
    and patching its ungated hook_out equals swapping the shared expert's output alone."""
    model, clean = eager.model, eager.inputs
    valid = clean.attention_mask.bool()
    closed = model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{FULL_LAYER}.mlp.shared_expert.hook_gate",
                                                     lambda x, hook: torch.zeros_like(x))])
    gate = _hf_block(eager, FULL_LAYER).shared_expert_gate
    theirs = _hf_logits(eager, clean, [(gate, lambda module, args, out: torch.full_like(out, -torch.inf))])
    assert (closed - theirs)[valid].abs().max() < 1e-6 and (closed - model(clean))[valid].abs().max() > 1e-4
    shut = model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{FULL_LAYER}.mlp.shared_expert.hook_gate_logit",
                                                   lambda x, hook: torch.full_like(x, -torch.inf))])
    assert torch.equal(shut, closed)

    block, kept = _hf_block(eager, LINEAR_LAYER), {}
    _hf_logits(eager, clean, [(m, lambda module, args, out: kept.__setitem__(module, out))
                              for m in (block.shared_expert, block.shared_expert_gate)])
    for point, parts in (("hook_gated_out", (block.shared_expert, block.shared_expert_gate)), ("hook_out", (block.shared_expert,))):
        name = f"blocks.{LINEAR_LAYER}.mlp.shared_expert.{point}"
        _, cache = model.run_with_cache(clean, names_filter=name)
        patched = model.run_with_hooks(corrupt, fwd_hooks=[(name, lambda x, hook: cache[name])])
        theirs = _hf_logits(eager, corrupt, [(m, lambda module, args, out: kept[module]) for m in parts])
        assert (patched - theirs)[valid].abs().max() < 1e-6 and (patched - model(corrupt))[valid].abs().max() > 1e-4


@pytest.mark.parametrize("renormalize", [False, True])
@torch.no_grad()
def test_expert_ablation_equals_a_hand_made_hf_edit(eager, renormalize):
    """`ablate_experts` of expert 2 in a linear-attention layer and expert 0 in a full-attention one
    at the image tokens equals HF with those routing weights zeroed there (the others kept, or
    renormalised); the shared expert is untouched."""
    model, inputs = eager.model, eager.inputs
    ablation = ablate_experts(model, inputs, {LINEAR_LAYER: [2], FULL_LAYER: [0]}, positions=TokenGroup.image(),
                              renormalize=renormalize)
    with ablation:
        ours = model(inputs)
    image = TokenGroup.image().resolve(inputs).flatten()
    handles = [_hf_block(eager, layer).experts.register_forward_pre_hook(_hf_zeroing(e, image, renormalize))
               for layer, e in ((LINEAR_LAYER, 2), (FULL_LAYER, 0))]
    try:
        theirs = eager.reference(**inputs.hf_kwargs()).logits
    finally:
        for handle in handles:
            handle.remove()
    valid = inputs.attention_mask.bool()
    assert (ours - theirs)[valid].abs().max() < 1e-6
    assert ablation.ablated[LINEAR_LAYER] > 0 and ablation.ablated[FULL_LAYER] > 0
    assert (ours - model(inputs))[valid].abs().max() > 1e-4


@torch.no_grad()
def test_expert_sweep_equals_patching_one_expert_at_a_time(eager, corrupt):
    """`expert_sweep` (clean -> mirrored) over a linear and a full-attention layer gives each
    expert's metric with its contribution at the image tokens taken from the clean run."""
    model, clean = eager.model, eager.inputs
    layers = [LINEAR_LAYER, FULL_LAYER]
    swept = expert_sweep(model, clean, corrupt, METRIC, layers=layers, positions=TokenGroup.image())
    assert swept.shape == (len(layers), N_EXPERTS, len(clean))
    _, cache = model.run_with_cache(clean, names_filter=lambda n: ".experts." in n and n.endswith("hook_out"))
    image = TokenGroup.image().resolve(corrupt)[..., None]
    for i, layer in enumerate(layers):
        for e in range(N_EXPERTS):
            name = f"blocks.{layer}.mlp.experts.{e}.hook_out"
            logits = model.run_with_hooks(corrupt, fwd_hooks=[(name, lambda x, hook: torch.where(image, cache[hook.name], x))])
            torch.testing.assert_close(swept[i, e], METRIC({"logits": logits}, corrupt), atol=1e-5, rtol=0)
    assert swept.std() > 1e-5, "experts differ in what they restore"


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@torch.no_grad()
def test_every_experts_implementation_is_exact(implementation):
    """Hooks off run HF's own experts kernel bit for bit; every point hooked recomputes the eager
    maths, within 1e-5 of that kernel."""
    fresh = tier.build_family(lambda: tiny_qwen3_5_moe(experts_implementation=implementation))
    model, inputs = fresh.model, fresh.inputs
    theirs = fresh.reference(**inputs.hf_kwargs()).logits
    assert torch.equal(model(inputs), theirs)
    hooked = model.run_with_hooks(inputs, fwd_hooks=[(lambda name: True, lambda x, hook: x.clone())])
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(hooked[valid], theirs[valid], atol=1e-5, rtol=0)


def test_a_shared_expert_the_spec_misreads_is_refused(builder, monkeypatch):
    """A spec forgetting the shared expert's gate leaves plain logits exact: loading refuses it at
    the first block; one forgetting the shared expert is refused naming the MoE block."""
    hf_model, processor = builder()
    ungated = replace(QWEN3_5_MOE_BLOCK, moe=MoESpec(shared_expert="shared_expert"))
    monkeypatch.setattr(Qwen3_5Moe, "llm_block", ungated)
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0 .*does not match its block spec"):
        HookedMLLM.from_hf(hf_model, processor)
    hf_model, processor = builder()
    monkeypatch.setattr(Qwen3_5Moe, "llm_block", replace(QWEN3_5_MOE_BLOCK, moe=MoESpec()))
    with pytest.raises(UnsupportedModelError, match="Qwen3_5MoeSparseMoeBlock: the config and the MoE spec disagree "
                                                    "on whether the block has a shared expert"):
        HookedMLLM.from_hf(hf_model, processor)


# the bridge's names: Qwen3.5's, the router as `mlp.gate`, the shared expert's projections
BRIDGE_NAMES = {
    **qwen3_5.BRIDGE_NAMES,
    "blocks.1.mlp.gate.hook_out": "blocks.1.mlp.hook_router_logits",
    "blocks.0.mlp.gate.hook_expert_indices": "blocks.0.mlp.hook_expert_indices",
    "blocks.2.mlp.gate.hook_expert_weights": "blocks.2.mlp.hook_expert_weights",
    "blocks.3.mlp.shared_expert.gate.hook_out": "blocks.3.mlp.shared_expert.hook_pre",
    "blocks.3.mlp.shared_expert.in.hook_out": "blocks.3.mlp.shared_expert.hook_pre_linear",
    "blocks.1.mlp.shared_expert.out.hook_in": "blocks.1.mlp.shared_expert.hook_post",
    "blocks.2.mlp.shared_expert_gate.hook_out": "blocks.2.mlp.shared_expert.hook_gate_logit",
    "blocks.2.mlp.hook_out": "blocks.2.hook_mlp_out",
}
WITHHELD_BRIDGE_NAMES = qwen3_5.WITHHELD_BRIDGE_NAMES  # a mixer's names outside the blocks of its kind
# no dense MLP anywhere; the routed experts' sum has no point of ours
UNKNOWN_BRIDGE_NAMES = (*WITHHELD_BRIDGE_NAMES, "blocks.0.mlp.dense_gate.hook_out", "blocks.1.mlp.in.hook_out",
                        "blocks.2.mlp.experts.hook_out")


def test_bridge_hook_names_are_aliases(eager):
    assert_bridge_aliases(eager.model, eager.inputs, BRIDGE_NAMES)
    for name in UNKNOWN_BRIDGE_NAMES:
        with pytest.raises(Exception, match="unknown hook name"):
            eager.model.resolve_hook_name(name)
