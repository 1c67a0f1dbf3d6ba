"""Bidirectional image attention equals Hugging Face with the equivalent 4D mask."""

from __future__ import annotations

import torch

from mmlens.interventions import bidirectional_image_attention, image_attention_mask

from conftest import build_tiny, random_images


@torch.no_grad()
def test_all_layers_equal_hf_with_bidirectional_4d_mask(tiny):
    model, inputs, cfg = tiny.model, tiny.inputs, tiny.model.cfg
    with bidirectional_image_attention(model, inputs) as edit:
        ours, cache = model.run_with_cache(inputs, names_filter="blocks.0.attn.hook_pattern")
    mask = image_attention_mask(inputs.input_ids, inputs.attention_mask, cfg.image_token_id, cfg.n_image_tokens)
    theirs = tiny.reference(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    pattern = cache["blocks.0.attn.hook_pattern"]
    positions = inputs.layout.positions(0)
    assert pattern[0, :, positions[0], positions[-1]].min() > 0, "the first image token reads the last"
    allowed = edit.effective_mask()
    real_rows = inputs.attention_mask.bool()  # padded query rows are fully masked (uniform), as in HF
    assert (pattern.sum(1).bool() <= allowed)[real_rows].all(), "attention only where the effective mask allows"
    assert edit._stash == {}, "no query or key outlives the run that computed it"


@torch.no_grad()
def test_layer_subset_and_images_stay_separate():
    tiny = build_tiny("clip")
    images = random_images(3)
    inputs = tiny.model.prepare([[images[0], images[1]], [images[2]]], ["compare", "how many"])
    with bidirectional_image_attention(tiny.model, inputs, layers=[1]):
        _, cache = tiny.model.run_with_cache(inputs, names_filter=lambda n: n.endswith("hook_pattern") and n.startswith("blocks"))
    first, second = inputs.layout.images[0]
    p0, p1 = cache["blocks.0.attn.hook_pattern"][0], cache["blocks.1.attn.hook_pattern"][0]
    assert p0[:, first.positions[0], first.positions[-1]].max() == 0  # layer 0 stays causal
    assert p1[:, first.positions[0], first.positions[-1]].min() > 0
    assert p1[:, first.positions[-1], second.positions[0]].max() == 0  # never into the next image


@torch.no_grad()
def test_a_model_trained_bidirectionally_runs_that_way():
    """config.mmlens_image_attention = "bidirectional" makes every forward use the image mask."""
    causal = build_tiny("clip")
    twin = build_tiny("clip")
    twin.model.hf_model.config.mmlens_image_attention = "bidirectional"
    from mmlens import HookedMLLM

    bidir = HookedMLLM.from_hf(twin.model.hf_model, twin.model.processor)
    inputs = causal.inputs
    with bidirectional_image_attention(causal.model, inputs):
        expected = causal.model(inputs)
    torch.testing.assert_close(bidir(inputs), expected, atol=1e-5, rtol=0)
    answers = bidir.generate(inputs, max_new_tokens=2)
    assert len(answers) == 3
