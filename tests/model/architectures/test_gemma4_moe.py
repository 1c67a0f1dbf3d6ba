"""Gemma 4 26B-A4B-style LLMs: a mixture of experts beside every block's dense MLP (the router reads
the residual through its own scaled norm; each kept weight times a per-expert scale; the dense and
routed branches each normed, then summed). The tier runs on it (with keys as values in the full
layers, as released); the MoE points hold Hugging Face's routing, expert patching and ablation equal
hand-made edits of Hugging Face's experts module, and what stays unsupported is refused by name."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from PIL import ImageOps

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import UnsupportedModelError
from mmlens.interventions import TokenGroup, ablate_experts
from mmlens.testing.families.gemma4 import tiny_gemma4

import family_tier as tier
from conftest import random_images
from family_tier import PROMPTS
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures
from test_moe_hooks import _hf_zeroing, contribution

N_EXPERTS, TOP_K, LAYER = 4, 2, 1
SEED = 3
MOE = dict(experts=N_EXPERTS, attention_k_eq_v=True)

family, eager, builder = tier.fixtures({
    "experts": lambda attn: tiny_gemma4(attn_implementation=attn, **MOE),
    "experts_vision_bidirectional": lambda attn: tiny_gemma4(attn_implementation=attn, bidirectional_attention="vision",
                                                             **MOE),
}, eager_variants=["experts"])


def _hf_layer(eager, layer: int = LAYER) -> torch.nn.Module:
    return eager.reference.model.language_model.layers[layer]


@contextmanager
def hooked_hf_experts(eager, hook, layer: int = LAYER) -> Iterator[None]:
    """Hugging Face's experts module of `layer` with a forward hook."""
    handle = _hf_layer(eager, layer).experts.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_every_block_has_the_dense_mlp_as_shared_expert_and_the_moe_points(eager):
    model = eager.model
    moe = model.cfg.llm.moe
    assert (moe.layers, moe.n_experts, moe.top_k, moe.shared_expert) == (tuple(range(model.cfg.n_layers)), N_EXPERTS,
                                                                         TOP_K, True)
    names = set(model.hook_names())
    for layer in range(model.cfg.n_layers):
        mlp = f"blocks.{layer}.mlp."
        assert {mlp + p for p in ("hook_router_logits", "hook_expert_indices", "hook_expert_weights")} <= names
        assert {f"{mlp}shared_expert.{p}" for p in ("hook_pre", "hook_pre_linear", "hook_post", "hook_out")} <= names
        assert mlp + "hook_pre" not in names
    hf = model.hf_model.model.language_model.layers[LAYER]
    assert torch.equal(model.blocks[LAYER].mlp.W_gate, hf.router.proj.weight.T)
    assert torch.equal(model.blocks[LAYER].mlp.shared_expert.W_out, hf.mlp.down_proj.weight.T)
    assert torch.equal(model.blocks[LAYER].mlp.experts[3].W_out, hf.experts.down_proj[3].T)


@torch.no_grad()
def test_routing_points_hold_hf_routing_and_the_branches_make_the_mlp_output(eager):
    """The router's logits, chosen experts and weights (per-expert scale included) are Hugging Face's
    router's on the residual after attention; the experts' hook_out sum to the routed branch, which
    with the dense branch (`shared_expert.hook_out`), each through its norm, makes hook_mlp_out."""
    model, inputs = eager.model, eager.inputs
    mlp = f"blocks.{LAYER}.mlp."
    _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.startswith(mlp) or n in (
        f"blocks.{LAYER}.hook_resid_mid", f"blocks.{LAYER}.ln2.hook_normalized", f"blocks.{LAYER}.hook_mlp_out"))
    layer = _hf_layer(eager)
    residual = cache[f"blocks.{LAYER}.hook_resid_mid"].flatten(0, 1)
    _, weights, indices = layer.router(residual)
    assert torch.equal(cache[mlp + "hook_expert_indices"].flatten(0, 1), indices)
    torch.testing.assert_close(cache[mlp + "hook_expert_weights"].flatten(0, 1), weights, atol=1e-6, rtol=0)
    assert (layer.router.per_expert_scale - 1).abs().max() > 0.05, "the builder draws the per-expert scales"
    routed = sum(cache[f"{mlp}experts.{e}.hook_out"] for e in range(N_EXPERTS))
    hf_routed = layer.experts(layer.pre_feedforward_layernorm_2(residual), indices, weights).view_as(routed)
    torch.testing.assert_close(routed, hf_routed, atol=1e-6, rtol=0)
    dense = cache[mlp + "shared_expert.hook_out"]
    torch.testing.assert_close(dense, layer.mlp(cache[f"blocks.{LAYER}.ln2.hook_normalized"]))
    both = layer.post_feedforward_layernorm_1(dense) + layer.post_feedforward_layernorm_2(routed)
    torch.testing.assert_close(cache[f"blocks.{LAYER}.hook_mlp_out"], layer.post_feedforward_layernorm(both))


@torch.no_grad()
def test_caching_every_expert_point_and_patching_one_expert_equals_a_hand_hook_on_hf(eager):
    """Every MoE point caches with its documented shape; expert 3's hook_out patched from the clean
    run into the mirrored one equals Hugging Face's mirrored run with a forward hook on the experts
    module swapping expert 3's contribution for the clean one."""
    model, clean = eager.model, eager.inputs
    _, cache = model.run_with_cache(clean, names_filter=lambda name: ".mlp." in name and not name.startswith("vision"))
    batch, pos = clean.input_ids.shape
    for layer in range(model.cfg.n_layers):
        mlp = f"blocks.{layer}.mlp."
        assert cache[mlp + "hook_router_logits"].shape == (batch, pos, N_EXPERTS)
        indices = cache[mlp + "hook_expert_indices"]
        assert indices.shape == cache[mlp + "hook_expert_weights"].shape == (batch, pos, TOP_K)
        for e in range(N_EXPERTS):
            served = int((indices == e).sum())
            assert cache[f"{mlp}experts.{e}.hook_post"].shape == (served, model.cfg.llm.moe.d_expert)
            assert (cache[f"{mlp}experts.{e}.hook_out"][~(indices == e).any(-1)] == 0).all()
    corrupt = model.prepare([ImageOps.mirror(image) for image in random_images(3)], PROMPTS)
    name = f"blocks.{LAYER}.mlp.experts.3.hook_out"
    patched = model.run_with_hooks(corrupt, fwd_hooks=[(name, lambda x, hook: cache[name])])
    kept, hf_runs = {}, []
    keep = lambda module, args, out: kept.setdefault("clean", contribution(module, *args, expert=3))  # noqa: E731
    swap = lambda module, args, out: out - contribution(module, *args, expert=3) + kept["clean"]  # noqa: E731
    for inputs, hook in ((clean, keep), (corrupt, swap)):
        with hooked_hf_experts(eager, hook):
            hf_runs.append(eager.reference(**inputs.hf_kwargs()).logits)
    theirs, valid = hf_runs[1], clean.attention_mask.bool()
    assert (patched - theirs)[valid].abs().max() < 1e-5
    assert (patched - model(corrupt))[valid].abs().max() > 1e-4, "the patch changed something"


@pytest.mark.parametrize("renormalize", [False, True])
@torch.no_grad()
def test_expert_ablation_equals_a_hand_made_hf_edit(eager, renormalize):
    """`ablate_experts` of expert 2 at the image tokens equals Hugging Face with its routing weight
    zeroed there (the others kept, or rescaled to their sum); the dense MLP is untouched."""
    model, inputs = eager.model, eager.inputs
    ablation = ablate_experts(model, inputs, {LAYER: [2]}, positions=TokenGroup.image(), renormalize=renormalize)
    with ablation:
        ours = model(inputs)
    image = TokenGroup.image().resolve(inputs).flatten()
    handle = _hf_layer(eager).experts.register_forward_pre_hook(_hf_zeroing(2, image, renormalize))
    try:
        theirs = eager.reference(**inputs.hf_kwargs()).logits
    finally:
        handle.remove()
    valid = inputs.attention_mask.bool()
    assert (ours - theirs)[valid].abs().max() < 1e-5
    assert ablation.ablated[LAYER] > 0 and (ours - model(inputs))[valid].abs().max() > 1e-4


def test_neuron_expansion_is_refused_and_the_whole_mlp_outputs_sum(eager):
    model, inputs = eager.model, eager.inputs
    _, cache = model.run_with_cache(inputs)
    with pytest.raises(UnsupportedModelError, match="mixture of experts"):
        cache.get_full_resid_decomposition(2, expand_neurons=True)
    full = cache.get_full_resid_decomposition(model.cfg.n_layers, expand_neurons=False)
    torch.testing.assert_close(full.sum(0), cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"], atol=1e-4, rtol=1e-4)


def test_bidirectional_attention_over_every_token_stays_refused():
    hf_model, processor = tiny_gemma4(**MOE)
    hf_model.config.text_config.use_bidirectional_attention = "all"
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention='all' is not supported"):
        HookedMLLM.from_hf(hf_model, processor)


def test_bridge_names_of_the_dense_mlp_are_the_shared_experts(eager):
    """TransformerBridge wraps the dense MLP as `mlp` beside `router` and `experts`."""
    tier.assert_bridge_aliases(eager.model, eager.inputs, {
        "blocks.1.mlp.gate.hook_out": "blocks.1.mlp.shared_expert.hook_pre",
        "blocks.1.mlp.out.hook_in": "blocks.1.mlp.shared_expert.hook_post",
        "blocks.1.mlp.hook_out": "blocks.1.mlp.shared_expert.hook_out",
        "blocks.2.ln2_post.hook_out": "blocks.2.ln2_post.hook_normalized",
    })


def test_every_analysis_runs():
    """The studies' plumbing through the MoE blocks (a seed whose random probe confuses some classes,
    which the anchor study needs)."""
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)
    tier.every_analysis_runs(HookedMLLM.from_hf(*tiny_gemma4(**MOE, seed=SEED)), scenes)
