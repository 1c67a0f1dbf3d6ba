"""Cache helpers that know images: decompositions sum to the residual at image positions, apply_ln
paths reproduce the logits, vision has the same helpers, short keys name every stage."""

from __future__ import annotations

import pytest
import torch
from conftest import random_images


@pytest.fixture(scope="module")
def cached(tiny):
    with torch.no_grad():
        logits, cache = tiny.model.run_with_cache(tiny.inputs)
    return tiny.model, tiny.inputs, logits, cache


@torch.no_grad()
def test_decompose_resid_sums_to_the_residual_at_image_positions(cached):
    model, inputs, _, cache = cached
    image = inputs.layout.image_token_mask()
    for layer in (0, 1, model.cfg.n_layers):
        stack, labels = cache.decompose_resid(layer, return_labels=True)
        target = cache["resid_pre", layer] if layer < model.cfg.n_layers else cache["resid_post", -1]
        torch.testing.assert_close(stack.sum(0)[image], target[image], atol=1e-5, rtol=0)
        assert labels[0] == "embed"
    # the embed term is what the LLM received: the projected image tokens, not the placeholder
    embed = cache.decompose_resid(0)[0]
    fed = inputs.input_ids == model.cfg.image_token_id  # grid tokens and, when the LLM sees it, CLS
    torch.testing.assert_close(embed[fed], cache["adapter.hook_out"].flatten(0, 1))
    # hook_embed is what the embedding step adds to the residual, so TL's own ActivationCache reads the same
    assert torch.equal(cache["hook_embed"], cache["hook_multimodal_embed"])
    torch.testing.assert_close(cache["hook_embed"], cache["blocks.0.hook_resid_pre"], atol=0, rtol=0)


@torch.no_grad()
def test_full_decomposition_sums_to_the_residual_everywhere(cached):
    model, _, _, cache = cached
    for stage, final in (("llm", cache["resid_post", -1]), ("vision", cache["resid_post", -1, "vision"])):
        stack, labels = cache.get_full_resid_decomposition(stage=stage, return_labels=True)
        torch.testing.assert_close(stack.sum(0), final, atol=1e-4, rtol=0)
        assert labels[0] == "L0H0" and labels[-1] == "bias"


@torch.no_grad()
def test_accumulated_resid_with_final_norm_gives_the_logits(cached):
    model, _, logits, cache = cached
    stack, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert labels[-1] == "final_post" and len(labels) == model.cfg.n_layers + 1
    torch.testing.assert_close(model.unembed(stack[-1]), logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(stack[-1] @ model.W_U + model.b_U, logits, atol=1e-5, rtol=0)
    lens, lens_labels = cache.logit_lens()
    assert lens_labels == labels
    torch.testing.assert_close(lens[-1], logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_direct_logit_attribution_sums_to_the_logit_difference(cached):
    model, inputs, logits, cache = cached
    right, wrong = torch.tensor([5, 7, 9]), torch.tensor([6, 8, 10])
    rows = torch.arange(len(right))
    diff = logits[rows, -1, right] - logits[rows, -1, wrong]
    layers = cache.decompose_resid(pos_slice=-1)
    attrs = cache.logit_attrs(layers, right, wrong, pos_slice=-1)
    torch.testing.assert_close(attrs.sum(0), diff, atol=1e-5, rtol=0)
    heads = cache.stack_head_results(pos_slice=-1, incl_remainder=True)
    head_attrs = cache.logit_attrs(heads, right, wrong, pos_slice=-1)
    torch.testing.assert_close(head_attrs.sum(0), diff, atol=1e-5, rtol=0)
    direction = model.tokens_to_residual_directions(right) - model.tokens_to_residual_directions(wrong)
    projected = cache.get_full_resid_decomposition(apply_ln=True, project_output_onto=direction[0], pos_slice=-1)
    torch.testing.assert_close(projected.sum(0)[0], diff[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_head_results_without_a_rerun_equal_hook_result(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    _, cache = model.run_with_cache(inputs)
    model.set_use_attn_result(True)
    try:
        _, with_results = model.run_with_cache(inputs, names_filter=lambda n: n.endswith("attn.hook_result"))
    finally:
        model.set_use_attn_result(False)
    stacked = cache.stack_head_results()
    direct = torch.cat([with_results["result", l, "attn"] for l in range(model.cfg.n_layers)], dim=-2)
    torch.testing.assert_close(stacked, direct.movedim(-2, 0), atol=1e-5, rtol=0)


@torch.no_grad()
def test_vision_stage_helpers_and_short_keys(cached):
    model, _, _, cache = cached
    v = model.cfg.vision
    acc = cache.accumulated_resid(stage="vision")
    assert acc.shape[0] == v.n_layers + 1
    torch.testing.assert_close(acc[1], cache["vision.blocks.0.hook_resid_post"])
    assert cache.stack_head_results(stage="vision").shape[0] == v.n_layers * v.n_heads
    patterns = cache.stack_activation("pattern", stage="vision")
    assert torch.equal(patterns[-1], cache["pattern", -1, "vision"])
    assert torch.equal(cache["pattern", 3 % v.n_layers, "vision"], cache[f"vision.blocks.{3 % v.n_layers}.attn.hook_pattern"])
    assert torch.equal(cache["scale", 0, "ln1", "vision"], cache["vision.blocks.0.ln1.hook_scale"])
    assert torch.equal(cache["out", "adapter"], cache["adapter.hook_out"])
    # apply_ln on a vision stack uses the vision block's own norm
    stack = cache.decompose_resid(1, stage="vision")
    normed = cache.apply_ln_to_stack(stack, 1, stage="vision").sum(0)
    torch.testing.assert_close(normed, cache["vision.blocks.1.ln1.hook_normalized"], atol=1e-4, rtol=0)


@torch.no_grad()
def test_remove_batch_dim_asserts_one_row(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    with pytest.raises(AssertionError, match="batch size 3"):
        model.run_with_cache(inputs, remove_batch_dim=True)
    one = model.prepare(random_images(1)[0], "how many")
    _, cache = model.run_with_cache(one, remove_batch_dim=True)
    assert cache["resid_pre", 0].shape == (one.input_ids.shape[1], model.cfg.d_model)
    assert cache.accumulated_resid().shape[1:] == cache["resid_pre", 0].shape

