"""Mixture-of-experts hook points (`runtime/moe.py`), checked against Hugging Face's own MoE
modules edited by hand: caching every expert point, patching one expert's output, routing edits
(valid ones equal HF fed the same routing, invalid ones refused) and the interventions API's
expert ablation (its other tools: tests/interventions/test_experts.py); and the MoESpec fields of
other families' MoE blocks (a shared expert with a sigmoid gate; sigmoid top-k routing that
weights the experts' input), run on their Hugging Face modules directly."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import ImageOps
from torch.nn import functional as F

from mmlens import HookedMLLM
from mmlens.errors import HookReturnError
from mmlens.interventions import TokenGroup, ablate_experts
from mmlens.model.config import MoEConfig
from mmlens.model.hook_tree import MoEHooks
from mmlens.model.runtime.moe import MoESpec, instrument_moe
from mmlens.testing.families.qwen3_vl_moe import tiny_qwen3_vl_moe

from conftest import random_images

PROMPTS = ["what is in the image ?", "how many", "the colour of the left shape is ?"]
N_EXPERTS, MOE_LAYERS = 4, (1, 2)


class Setup:
    def __init__(self):
        hf_model, processor = tiny_qwen3_vl_moe()
        processor.tokenizer.padding_side = "left"
        self.reference = copy.deepcopy(hf_model)
        self.model = HookedMLLM.from_hf(hf_model, processor)
        images = random_images(3)
        self.clean = self.model.prepare(images, PROMPTS)
        self.corrupt = self.model.prepare([ImageOps.mirror(im) for im in images], PROMPTS)  # same sizes, same layout
        self.valid = self.clean.attention_mask.bool()

    def hf_experts(self, layer: int):
        return self.reference.model.language_model.layers[layer].mlp.experts

    def hf_logits(self, inputs, edits: dict) -> torch.Tensor:
        """Hugging Face's logits with forward hooks `edits` (layer -> hook) on its experts modules."""
        handles = [self.hf_experts(layer).register_forward_hook(hook) for layer, hook in edits.items()]
        try:
            with torch.no_grad():
                return self.reference(**inputs.hf_kwargs()).logits
        finally:
            for handle in handles:
                handle.remove()


@pytest.fixture(scope="module")
def setup():
    return Setup()


def contribution(experts, hidden, indices, weights, expert: int) -> torch.Tensor:
    """Expert `expert`'s weighted output at each token, written out from HF's fused parameters
    (zero where the token did not choose it): [tokens, d_model]."""
    out = torch.zeros_like(hidden)
    tokens, slots = torch.where(indices == expert)
    gate, up = F.linear(hidden[tokens], experts.gate_up_proj[expert]).chunk(2, dim=-1)
    rows = F.linear(experts.act_fn(gate) * up, experts.down_proj[expert]) * weights[tokens, slots, None]
    out[tokens] = rows
    return out


@torch.no_grad()
def test_caching_every_expert_point_and_patching_one_expert_equals_a_hand_hook_on_hf(setup):
    """`run_with_cache` keeps every MoE point with its documented shape (router logits [b, s, E];
    chosen experts and weights [b, s, k]; an expert's hook_pre / hook_pre_linear / hook_post
    [tokens it serves, d_expert]; its hook_out [b, s, d_model]). Patching expert 2's hook_out of
    layer 1 from the clean run into the corrupted one equals Hugging Face's corrupted run with a
    forward hook on that layer's experts module swapping expert 2's contribution for the clean one."""
    model = setup.model
    _, cache = model.run_with_cache(setup.clean, names_filter=lambda name: ".mlp." in name)
    batch, pos = setup.clean.input_ids.shape
    moe = model.cfg.llm.moe
    for layer in MOE_LAYERS:
        block = f"blocks.{layer}.mlp."
        assert cache[block + "hook_router_logits"].shape == (batch, pos, N_EXPERTS)
        indices = cache[block + "hook_expert_indices"]
        assert indices.shape == cache[block + "hook_expert_weights"].shape == (batch, pos, moe.top_k)
        for e in range(N_EXPERTS):
            served = int((indices == e).sum())
            for point in ("hook_pre", "hook_pre_linear", "hook_post"):
                assert cache[f"{block}experts.{e}.{point}"].shape == (served, moe.d_expert)
            out = cache[f"{block}experts.{e}.hook_out"]
            assert out.shape == (batch, pos, model.cfg.d_model)
            assert (out[~(indices == e).any(-1)] == 0).all() and served > 0
    name = "blocks.1.mlp.experts.2.hook_out"
    patched = model.run_with_hooks(setup.corrupt, fwd_hooks=[(name, lambda x, hook: cache[name])])

    clean = {}

    def keep_clean(module, args, out):
        clean["expert 2"] = contribution(module, *args, expert=2)

    setup.hf_logits(setup.clean, {1: keep_clean})

    def swap_expert_2(module, args, out):
        return out - contribution(module, *args, expert=2) + clean["expert 2"]

    theirs = setup.hf_logits(setup.corrupt, {1: swap_expert_2})
    assert (patched - theirs)[setup.valid].abs().max() < 1e-6
    assert (patched - model(setup.corrupt))[setup.valid].abs().max() > 1e-4, "the patch changed something"


@torch.no_grad()
def test_experts_outputs_sum_to_the_moe_output(setup):
    """Summed in expert order, the experts' hook_out give the block's MLP output (hook_mlp_out) bit
    for bit, and that output is Hugging Face's MoE block's on the same input."""
    model = setup.model
    _, cache = model.run_with_cache(setup.clean)
    for layer in MOE_LAYERS:
        total = torch.zeros_like(cache[f"blocks.{layer}.hook_mlp_out"])
        for e in range(N_EXPERTS):
            total = total + cache[f"blocks.{layer}.mlp.experts.{e}.hook_out"]
        assert torch.equal(total, cache[f"blocks.{layer}.hook_mlp_out"])
        hf_block = setup.reference.model.language_model.layers[layer].mlp
        assert torch.equal(hf_block(cache[f"blocks.{layer}.ln2.hook_normalized"]), total)


def _route_elsewhere(indices: torch.Tensor, hook) -> torch.Tensor:
    """Every token's experts moved one along (still distinct and in range)."""
    return (indices + 1) % N_EXPERTS


@torch.no_grad()
def test_a_valid_routing_edit_equals_hf_fed_that_routing(setup):
    """Editing hook_expert_indices re-routes the tokens: the same as Hugging Face's router
    returning those experts (with its own weights)."""
    model = setup.model
    ours = model.run_with_hooks(setup.clean, fwd_hooks=[("blocks.2.mlp.hook_expert_indices", _route_elsewhere)])

    def reroute(module, args, out):
        logits, weights, indices = out
        return logits, weights, (indices + 1) % N_EXPERTS

    router = setup.reference.model.language_model.layers[2].mlp.gate
    handle = router.register_forward_hook(reroute)
    try:
        theirs = setup.reference(**setup.clean.hf_kwargs()).logits
    finally:
        handle.remove()
    assert (ours - theirs)[setup.valid].abs().max() < 1e-6
    assert (ours - model(setup.clean))[setup.valid].abs().max() > 1e-4


@pytest.mark.parametrize("edit, message", [
    (lambda indices, hook: torch.full_like(indices, N_EXPERTS), r"outside 0\.\.3 .*no expert"),
    (lambda indices, hook: indices - 1, r"outside 0\.\.3"),
    (lambda indices, hook: indices[..., :1].expand_as(indices).clone(), "same expert twice"),
])
def test_an_invalid_routing_edit_is_refused(setup, edit, message):
    """An edit that routes a token to an expert that does not exist, or to one expert twice, is
    refused naming the point, never computed."""
    with pytest.raises(HookReturnError, match=f"blocks.1.mlp.hook_expert_indices: .*{message}"):
        setup.model.run_with_hooks(setup.clean, fwd_hooks=[("blocks.1.mlp.hook_expert_indices", edit)])


def _hf_zeroing(chosen: int, where: torch.Tensor, renormalize: bool):
    """A forward pre-hook on HF's experts module: the routing weight of expert `chosen` set to zero
    at the flat token positions `where` (the others rescaled to their old sum if `renormalize`)."""

    def hook(module, args):
        hidden, indices, weights = args
        hit = (indices == chosen) & where[:, None]
        kept = weights.masked_fill(hit, 0)
        if renormalize:
            rescaled = kept * (weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True))
            kept = torch.where(hit.any(-1, keepdim=True), rescaled, weights)
        return hidden, indices, kept

    return hook


@pytest.mark.parametrize("renormalize", [False, True])
@torch.no_grad()
def test_expert_ablation_equals_a_hand_made_hf_edit(setup, renormalize):
    """`ablate_experts` of expert 2 in layer 1 and expert 0 in layer 2 at the image tokens equals
    Hugging Face with those experts' routing weights zeroed at those tokens (the other weights
    kept, or renormalised to their sum); it counts what it removed and changed the logits."""
    model, inputs = setup.model, setup.clean
    ablation = ablate_experts(model, inputs, {1: [2], 2: [0]}, positions=TokenGroup.image(), renormalize=renormalize)
    with ablation:
        ours = model(inputs)
    image = TokenGroup.image().resolve(inputs).flatten()
    handles = [setup.hf_experts(layer).register_forward_pre_hook(_hf_zeroing(e, image, renormalize))
               for layer, e in ((1, 2), (2, 0))]
    try:
        theirs = setup.reference(**inputs.hf_kwargs()).logits
    finally:
        for handle in handles:
            handle.remove()
    assert (ours - theirs)[setup.valid].abs().max() < 1e-6
    assert ablation.ablated[1] > 0 and ablation.ablated[2] > 0
    assert (ours - model(inputs))[setup.valid].abs().max() > 1e-4


# Other families' MoE blocks, as MoESpec fields (their families register these when they arrive)
SHARED_EXPERT_SPEC = MoESpec(shared_expert="shared_expert", shared_expert_gate="shared_expert_gate")
SIGMOID_INPUT_WEIGHTED_SPEC = MoESpec(router="router", scoring="sigmoid", top_k_of="logits", renormalize=False,
                                      weights_on="input", transposed=True, shared_expert="shared_expert",
                                      returns_router_logits=True)


def _shared_expert_block():
    from transformers import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock

    config = Qwen3_5MoeTextConfig(hidden_size=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                                  shared_expert_intermediate_size=12)
    return Qwen3_5MoeSparseMoeBlock(config), MoEConfig((0,), 4, 2, 8, shared_expert=True), SHARED_EXPERT_SPEC, True


def _sigmoid_routed_block():
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    config = Llama4TextConfig(hidden_size=16, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2)
    block = Llama4TextMoe(config)
    # instrument_mlp's gated path reads `act_fn`; this MLP calls its activation `activation_fn`
    block.shared_expert.act_fn = block.shared_expert.activation_fn
    return block, MoEConfig((0,), 4, 2, 8, shared_expert=True), SIGMOID_INPUT_WEIGHTED_SPEC, False


@pytest.mark.parametrize("build", [_shared_expert_block, _sigmoid_routed_block], ids=["shared-gated", "sigmoid-input"])
@torch.no_grad()
def test_spec_fields_express_other_moe_blocks(build):
    """On Hugging Face's own MoE block of another family (random weights), every point hooked
    gives HF's output within 1e-6, and the routed experts' hook_out plus what the shared expert adds
    (its gated output where a gate scales it, else its hook_out) sum to it bit for bit."""
    torch.manual_seed(0)
    block, moe, spec, shared_gate = build()
    for parameter in block.parameters():
        parameter.normal_(0, 0.3)
    x = torch.randn(2, 5, 16)
    theirs = block(x)
    hooks = MoEHooks(moe, shared_gate)
    instrument_moe(block, hooks, spec)
    assert torch.equal(block(x)[0] if spec.returns_router_logits else block(x), theirs[0] if spec.returns_router_logits else theirs)
    seen = {}
    for name, point in hooks.named_modules():
        if hasattr(point, "add_hook") and name.rsplit(".", 1)[-1].startswith("hook_"):
            point.add_hook(lambda a, hook, name=name: seen.__setitem__(name, a.clone()))
    ours = block(x)
    if spec.returns_router_logits:
        (ours, logits), theirs = ours, theirs[0]
        assert logits.shape == (10, 4)
    assert (ours.reshape(theirs.shape) - theirs).abs().max() < 1e-6
    routed = sum(seen[f"experts.{e}.hook_out"] for e in range(4))
    added = seen["shared_expert.hook_gated_out" if shared_gate else "shared_expert.hook_out"]
    assert torch.equal(routed + added, ours.view(2, 5, 16))
    assert seen["hook_expert_weights"].shape == seen["hook_expert_indices"].shape == (2, 5, 2)
