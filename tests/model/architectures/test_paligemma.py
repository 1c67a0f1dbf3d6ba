"""PaliGemma: SigLIP tower, a linear projector, Gemma, and prefix-LM attention via token_type_ids."""

from __future__ import annotations

import torch

from mmlens.data import load_segmentation
from mmlens.model.runtime.attention_masks import additive_mask
from mmlens.testing_families import tiny_paligemma

import family_tier as tier
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures


family, eager, builder = tier.fixtures({"paligemma": lambda attn: tiny_paligemma(attn_implementation=attn)})


def test_images_come_first_and_carry_the_prefix_type(eager):
    inputs = eager.inputs
    assert set(inputs.extra) == {"token_type_ids"}
    for span in inputs.layout.spans:  # only left padding before an image
        assert not inputs.attention_mask[span.row, : span.positions[0]].any()
        assert (inputs.extra["token_type_ids"][span.row, span.positions] == 0).all()


@torch.no_grad()
def test_prefix_is_the_own_rule_and_causal_removes_it(eager):
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    assert model.image_attention == "prefix"
    plain = {"input_ids": inputs.input_ids, "pixel_values": inputs.pixel_values}
    own = model(inputs)
    # our reading of the rule, as a 4D mask, is what Hugging Face builds from token_type_ids
    edges = model.attention_edges(inputs)
    valid = inputs.attention_mask.bool()
    as_mask = reference(**plain, attention_mask=additive_mask(edges)).logits
    torch.testing.assert_close(as_mask[valid], own[valid], atol=1e-5, rtol=0)
    with model.using_image_attention("causal"):
        causal = model(inputs)
        assert not (model.attention_edges(inputs) & ~torch.ones_like(edges).tril()).any()
    torch.testing.assert_close(causal, reference(**plain, attention_mask=inputs.attention_mask).logits, atol=1e-5, rtol=0)
    assert (causal - own)[valid].abs().max() > 1e-4


def test_every_analysis_runs(eager):
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)
    tier.every_analysis_runs(eager.model, scenes)
