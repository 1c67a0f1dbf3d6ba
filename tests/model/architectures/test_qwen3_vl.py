"""Qwen3-VL: Qwen2-VL's packed tower with a learned position grid, a Qwen3 LLM (q/k norms,
interleaved M-RoPE) and deepstack: tower features the LLM adds to the image tokens after its first
layers, hooked as `adapter.deepstack.{i}.hook_out`. The deepstack tests compare against Hugging
Face's own model with its vision output edited (the term removed or swapped), not against mmlens."""

from __future__ import annotations

from contextlib import contextmanager

from dataclasses import replace

import pytest
import torch
from PIL import ImageOps

from mmlens import HookedMLLM
from mmlens.errors import UnsupportedModelError
from mmlens.model.architectures.qwen3_vl import QWEN3_BLOCK, Qwen3VL
from mmlens.model.runtime.instrument import AttentionSpec
from mmlens.testing_families import tiny_qwen3_vl

import family_tier as tier
import test_qwen2_vl as qwen2
from conftest import random_images
from family_tier import assert_bridge_aliases
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

# Qwen2-VL's own checks, on this file's fixtures; the two that read Qwen2-VL's hidden states and
# patch embeddings have Qwen3-VL versions below (deepstack and the position grid change them)
_OWN = {"test_cache_equals_hf_hidden_states", "test_vision_gather_reads_raster_patches"}
globals().update({test.__name__: test for test in qwen2.QWEN_TESTS if test.__name__ not in _OWN})
family, eager, builder = tier.fixtures({"qwen3-vl": lambda attn: tiny_qwen3_vl(attn_implementation=attn)})
LEVELS = 2  # tiny_qwen3_vl's deepstack levels (after vision blocks 0 and 1)


@contextmanager
def hf_deepstack_edited(reference, edit):
    """Hugging Face's model with its tower's deepstack features replaced by `edit(level, features)`
    before the LLM reads them (features: [n_image_tokens, d_model], every image of the batch)."""

    def replace(_module, _args, out):
        out.deepstack_features = [edit(level, f) for level, f in enumerate(out.deepstack_features)]
        return out

    handle = reference.model.visual.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def test_deepstack_terms_are_the_towers(eager):
    """`adapter.deepstack.{i}.hook_out` holds Hugging Face's deepstack features (the same
    computation, so bit for bit), one row per image token in the LLM's order; the layout gathers
    them per image like the merger's output."""
    model, inputs = eager.model, eager.inputs
    names = [f"adapter.deepstack.{i}.hook_out" for i in range(LEVELS)]
    _, cache = model.run_with_cache(inputs, names_filter=[*names, "adapter.hook_out"])
    tower = eager.reference.model.visual(inputs.pixel_values, grid_thw=inputs.extra["image_grid_thw"])
    assert len(tower.deepstack_features) == LEVELS
    for name, theirs in zip(names, tower.deepstack_features):
        assert cache[name].shape == cache["adapter.hook_out"].shape == (1, *theirs.shape)
        assert torch.equal(cache[name][0], theirs)
        present = inputs.layout.table("adapter").present
        assert inputs.layout.gather("adapter", cache[name])[present].shape == (int(present.sum()), model.cfg.d_model)


@torch.no_grad()
def test_cache_equals_hf_hidden_states(eager):
    """(The tier's test, for deepstack.) The term is added inside layer i: `blocks.{i}.hook_resid_post` = resid_mid + mlp_out + the
    term at the image tokens (nothing elsewhere) = `blocks.{i+1}.hook_resid_pre`, and Hugging
    Face's hidden state after layer i (taken before its loop adds the term) plus the term is what
    layer i + 1 reads."""
    model, inputs = eager.model, eager.inputs
    _, cache = model.run_with_cache(inputs)
    ref = eager.reference(**inputs.hf_kwargs(), output_hidden_states=True)
    image = inputs.input_ids == model.cfg.image_token_id
    for layer in range(model.cfg.n_layers):
        post = cache[f"blocks.{layer}.hook_resid_post"]
        added = post - cache[f"blocks.{layer}.hook_resid_mid"] - cache[f"blocks.{layer}.hook_mlp_out"]
        if layer < LEVELS:
            term = cache[f"adapter.deepstack.{layer}.hook_out"][0]
            torch.testing.assert_close(added[image], term, atol=1e-5, rtol=0)
            assert term.abs().max() > 1e-2, "the term is not negligible"
        assert added[~image].abs().max() < 1e-5
        if layer + 1 < model.cfg.n_layers:
            assert torch.equal(post, cache[f"blocks.{layer + 1}.hook_resid_pre"])
        theirs = ref.hidden_states[layer + 1].clone()  # layer's output, before Hugging Face adds the term
        if layer < LEVELS:
            theirs[image] += cache[f"adapter.deepstack.{layer}.hook_out"][0]
        if layer + 1 < model.cfg.n_layers:
            torch.testing.assert_close(cache[f"blocks.{layer + 1}.hook_resid_pre"], theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], ref.hidden_states[0], atol=1e-5, rtol=0)
    features = torch.cat(eager.reference.model.get_image_features(inputs.pixel_values, inputs.extra["image_grid_thw"]).pooler_output)
    torch.testing.assert_close(cache["adapter.hook_out"][0], features, atol=1e-5, rtol=0)


@pytest.mark.parametrize("level", range(LEVELS))
@torch.no_grad()
def test_knocking_out_a_deepstack_term_equals_hf_without_it(family, level):
    """A hook zeroing `adapter.deepstack.{i}.hook_out` gives Hugging Face's logits with that
    level's features zeroed in its tower output (eager and sdpa); the term mattered."""
    model, inputs = family.model, family.inputs
    name = f"adapter.deepstack.{level}.hook_out"
    ours = model.run_with_hooks(inputs, fwd_hooks=[(name, lambda x, hook: torch.zeros_like(x))])
    with hf_deepstack_edited(family.reference, lambda i, f: torch.zeros_like(f) if i == level else f):
        theirs = family.reference(**inputs.hf_kwargs()).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    assert (ours - model(inputs))[valid].abs().max() > 1e-4, "the knockout changed something"


@torch.no_grad()
def test_patching_a_deepstack_term_equals_hf_with_the_other_images_features(eager):
    """Patching level 1's term from a run on mirrored images (same sizes, so the same token
    counts) equals Hugging Face fed those images' level-1 features with its own level 0."""
    model, inputs = eager.model, eager.inputs
    images = random_images(3)
    source = model.prepare([ImageOps.mirror(im) for im in images], tier.PROMPTS[:3])
    _, cache = model.run_with_cache(source, names_filter="adapter.deepstack.1.hook_out")
    patched = model.run_with_hooks(inputs, fwd_hooks=[("adapter.deepstack.1.hook_out",
                                                       lambda x, hook: cache["adapter.deepstack.1.hook_out"])])
    mirrored = eager.reference.model.visual(source.pixel_values, grid_thw=source.extra["image_grid_thw"]).deepstack_features[1]
    with hf_deepstack_edited(eager.reference, lambda i, f: mirrored if i == 1 else f):
        theirs = eager.reference(**inputs.hf_kwargs()).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(patched[valid], theirs[valid], atol=1e-5, rtol=0)
    assert (patched - model(inputs))[valid].abs().max() > 1e-4


@torch.no_grad()
def test_runs_from_merged_embeddings_and_mid_stack_carry_the_terms(eager):
    """Starting from the merged embeddings recomputes the terms (the tower's hooks stay quiet, the
    deepstack points fire and can be knocked out there too); starting at layer 1 from its residual
    adds only level 1's term (level 0's is already in that residual)."""
    model, inputs = eager.model, eager.inputs
    logits, cache = model.run_with_cache(inputs, names_filter=["hook_multimodal_embed", "blocks.1.hook_resid_pre",
                                                               "blocks.2.hook_resid_pre"])
    fired = []
    hooks = [(lambda n: n.startswith(("vision.", "adapter.")), lambda x, hook: fired.append(hook.name))]
    with model.hooks(fwd_hooks=hooks):
        shortcut = model(inputs, llm_inputs_embeds=cache["hook_multimodal_embed"])
    assert torch.equal(shortcut, logits)
    assert fired == ["adapter.deepstack.0.hook_out", "adapter.deepstack.1.hook_out"]
    torch.testing.assert_close(model(cache["blocks.1.hook_resid_pre"], start_at_layer=1, tokens=inputs), logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(cache["blocks.2.hook_resid_pre"], start_at_layer=2, tokens=inputs), logits, atol=1e-5, rtol=0)
    zero = [("adapter.deepstack.0.hook_out", lambda x, hook: torch.zeros_like(x))]
    knocked = model.run_with_hooks(inputs, fwd_hooks=zero)
    torch.testing.assert_close(model.run_with_hooks(inputs, llm_inputs_embeds=cache["hook_multimodal_embed"], fwd_hooks=zero),
                               knocked, atol=1e-5, rtol=0)
    stopped = model(inputs, stop_at_layer=1)
    assert torch.equal(stopped, cache["blocks.1.hook_resid_pre"]), "the residual entering layer 1 holds level 0's term"


@torch.no_grad()
def test_vision_gather_reads_raster_patches(eager):
    """`gather("vision")` puts each image's patches in raster order: `vision.hook_embed` (patch
    embedding plus the interpolated position grid) gathered equals what Hugging Face's block 0
    receives, read at each patch's slot in the processor's 2x2-group order."""
    model, inputs = eager.model, eager.inputs
    _, cache = model.run_with_cache(inputs, names_filter="vision.hook_embed")
    gathered = inputs.layout.gather("vision", cache["vision.hook_embed"])
    received = []
    visual = eager.reference.model.visual
    handle = visual.blocks[0].register_forward_pre_hook(lambda _m, args: received.append(args[0]))
    try:
        visual(inputs.pixel_values, grid_thw=inputs.extra["image_grid_thw"])
    finally:
        handle.remove()
    offset = 0
    for k, span in enumerate(inputs.layout.spans):
        _, h, w = inputs.extra["image_grid_thw"][span.image_index].tolist()
        own = received[0][offset : offset + h * w]
        offset += h * w
        r, c = span.segments[0].patches.cells.T
        slot = ((r // 2) * (w // 2) + c // 2) * 4 + (r % 2) * 2 + c % 2
        torch.testing.assert_close(gathered[k, : h * w], own[slot], atol=1e-6, rtol=0)
    # the position grid is part of it: without it the patch embedding alone differs
    assert (visual.patch_embed(inputs.pixel_values) - received[0]).abs().max() > 1e-3


# the deepstack layers' outputs: the bridge's are before the term is added, ours after
WITHHELD_BRIDGE_NAMES = ("blocks.0.hook_out", "blocks.1.hook_out")
BRIDGE_NAMES = {
    "vision_encoder.blocks.1.hook_in": "vision.blocks.1.hook_resid_pre",
    "vision_encoder.blocks.1.hook_out": "vision.blocks.1.hook_resid_post",
    "vision_encoder.blocks.0.norm2.hook_out": "vision.blocks.0.ln2.hook_normalized",
    "vision_encoder.blocks.0.attn.hook_in": "vision.blocks.0.ln1.hook_normalized",
    "vision_encoder.blocks.0.attn.hook_out": "vision.blocks.0.hook_attn_out",
    "vision_encoder.blocks.0.mlp.linear_fc1.hook_out": "vision.blocks.0.mlp.hook_pre",
    "vision_encoder.blocks.0.mlp.linear_fc2.hook_in": "vision.blocks.0.mlp.hook_post",
    "vision_encoder.deepstack_mergers.1.hook_out": "adapter.deepstack.1.hook_out",
    "vision_projector.hook_out": "adapter.hook_out",
    "embed.hook_out": "hook_embed",
    "blocks.1.hook_in": "blocks.1.hook_resid_pre",
    "blocks.2.hook_out": "blocks.2.hook_resid_post",
    "blocks.0.attn.q_norm.hook_out": "blocks.0.attn.q_ln.hook_normalized",
    "blocks.0.attn.hook_out": "blocks.0.hook_attn_out",
}


def test_bridge_hook_names_are_aliases(eager):
    """TransformerBridge's names resolve to ours; its `blocks.{i}.hook_out` of a deepstack layer
    (taken before the term is added) is not ours, so it is refused rather than aliased."""
    model, inputs = eager.model, eager.inputs
    assert_bridge_aliases(model, inputs, BRIDGE_NAMES)
    for name in (*WITHHELD_BRIDGE_NAMES, "vision_projector.hook_in", "vision_encoder.patch_embed.hook_out"):
        with pytest.raises(Exception, match="unknown hook name"):
            model.resolve_hook_name(name)


@torch.no_grad()
def test_the_llm_normalises_queries_and_keys_per_head(eager):
    """`attn.q_ln` / `attn.k_ln` are the Qwen3 per-head RMSNorms: they turn the cached `hook_q`
    ([batch, pos, head, d_head]) into the normalised queries, which the rotary then turns."""
    model, inputs = eager.model, eager.inputs
    names = ["blocks.0.attn.hook_q", "blocks.0.attn.q_ln.hook_normalized"]
    _, cache = model.run_with_cache(inputs, names_filter=names)
    q_norm = eager.reference.model.language_model.layers[0].self_attn.q_norm
    torch.testing.assert_close(cache[names[1]], q_norm(cache[names[0]]), atol=1e-6, rtol=0)
    assert model.cfg.llm.use_qk_norm


def test_a_spec_without_the_qk_norms_is_refused(builder, monkeypatch):
    """Forgetting the Qwen3 q/k norms (rotary kept) leaves plain logits exact; loading refuses it."""
    hf_model, processor = builder()
    monkeypatch.setattr(Qwen3VL, "llm_block", replace(QWEN3_BLOCK, attention=AttentionSpec()))
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0 .*does not match its block spec"):
        HookedMLLM.from_hf(hf_model, processor)


def test_more_deepstack_levels_than_llm_layers_are_refused():
    hf_model, processor = tiny_qwen3_vl(vision_layers=3, deepstack_layers=(0, 1, 2), llm_layers=2)
    with pytest.raises(UnsupportedModelError, match="3 deepstack levels .* only 2 LLM layers"):
        HookedMLLM.from_hf(hf_model, processor)
