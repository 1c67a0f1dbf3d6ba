"""LLaVA with a Pixtral tower (Pixtral-12B in LLaVA format): Mistral 3's packed tower and row-break
layout, LLaVA's one-token-per-patch projector, no norm after the tower."""

from __future__ import annotations

import copy

import pytest
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import UnsupportedModelError
from mmlens.model.architectures.llava.pixtral import LlavaPixtral
from mmlens.testing.families.llava import tiny_llava_pixtral

import family_tier as tier
from family_tier import assert_bridge_aliases
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures
from test_mistral3 import tower_mask

family, eager, builder = tier.fixtures({"pixtral": lambda attn: tiny_llava_pixtral(attn_implementation=attn)})


def test_a_pixtral_tower_picks_the_packed_variant(eager):
    """The checkpoint is LLaVA's class, its geometry Pixtral's: images at their own sizes, one LLM
    token per patch, rows closed by `[IMG_BREAK]`, the last by `[IMG_END]`; no `vision.ln_post`."""
    model, inputs = eager.model, eager.inputs
    assert type(model.architecture) is LlavaPixtral and model.cfg.architecture == "LlavaForConditionalGeneration"
    assert not model.cfg.vision.has_ln_post and not any(n.startswith("vision.ln_post") for n in model.hook_names())
    processor = model.processor
    assert len({tuple(span.segments[0].tokens.shape) for span in inputs.layout.spans}) == 3, "three grids in the batch"
    for span in inputs.layout.spans:
        (segment,) = span.segments
        rows, cols = segment.tokens.shape
        h, w = inputs.extra["image_sizes"][span.image_index].tolist()
        assert span.canvas == (h, w) and (rows, cols) == (h // 8, w // 8) == segment.patches.shape
        assert torch.equal(segment.patch_to_token, torch.arange(rows * cols)), "one token per patch"
        assert (inputs.input_ids[span.row, span.special["row_break"]].cpu() == processor.image_break_token_id).all()
        assert int(inputs.input_ids[span.row, span.special["end"]]) == processor.image_end_token_id


@torch.no_grad()
def test_the_projector_reads_the_towers_last_block_per_patch(eager):
    """`adapter.hook_in` is the tower's last hidden state (packed, no norm), and `adapter.hook_out`
    Hugging Face's image features, one row per patch."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    _, cache = model.run_with_cache(inputs, names_filter=["adapter.hook_in", "adapter.hook_out"])
    sizes = inputs.extra["image_sizes"]
    tower = reference.model.vision_tower(inputs.pixel_values, image_sizes=sizes, output_hidden_states=True)
    torch.testing.assert_close(cache["adapter.hook_in"], tower.hidden_states[-1], atol=1e-5, rtol=0)
    features = torch.cat(reference.model.get_image_features(inputs.pixel_values, image_sizes=sizes,
                                                            vision_feature_layer=-1,
                                                            vision_feature_select_strategy="full").pooler_output)
    torch.testing.assert_close(cache["adapter.hook_out"][0], features, atol=1e-5, rtol=0)
    assert cache["adapter.hook_out"].shape[1] == int((sizes // 8).prod(-1).sum())


def assert_packed_tower_knockout_equals_hf(family) -> None:
    """A tower knockout = Hugging Face's Pixtral tower with the blocked edges taken out of its own
    block-diagonal mask, and the reported mask is that one (any family with the packed tower)."""
    model, inputs = family.model, family.inputs
    ko, ours = tier.verified_vision_knockout(model, inputs)
    image = inputs.layout.image_of_patch()[0]
    allowed = (image[:, None] == image[None, :]) & ~ko.blocked[0].cpu()
    with tower_mask(allowed):
        theirs = family.reference(**inputs.hf_kwargs()).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    assert (ours - model(inputs))[valid].abs().max() > 1e-4, "the knockout changed something"
    assert torch.equal(ko.effective_mask()[0].cpu(), allowed)


@torch.no_grad()
def test_vision_knockout_equals_hf_with_its_mask(eager):
    assert_packed_tower_knockout_equals_hf(eager)


@pytest.mark.parametrize("field, value, refusal", [
    ("vision_feature_select_strategy", "default", "drops the first patch"),
    ("vision_feature_layer", [-1, -2], "several tower layers"),
])
def test_pixtral_settings_hugging_face_cannot_run_as_meant_are_refused(field, value, refusal):
    hf_model, processor = tiny_llava_pixtral()
    setattr(hf_model.config, field, value)
    with pytest.raises(UnsupportedModelError, match=refusal):
        HookedMLLM.from_hf(hf_model, processor)


@torch.no_grad()
def test_two_images_in_one_row(builder):
    """Two images of different sizes in one prompt: two spans, every hook active = Hugging Face."""
    hf_model, processor = builder()
    reference = copy.deepcopy(hf_model)
    model = HookedMLLM.from_hf(hf_model, processor)
    a, b, c = tier.random_images(3)
    inputs = model.prepare([[a, b], [c]], ["compare them", "what"])
    assert [[span.image_index for span in row] for row in inputs.layout.images] == [[0, 1], [2]]
    ours = model.run_with_hooks(inputs, fwd_hooks=[(lambda name: True, lambda x, hook: x.clone())])
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], reference(**inputs.hf_kwargs()).logits[valid], atol=1e-5, rtol=0)


BRIDGE_NAMES = {
    "vision_encoder.hook_out": "vision.blocks.1.hook_resid_post",
    "vision_projector.hook_in": "vision.blocks.1.hook_resid_post",
    "vision_projector.hook_out": "adapter.hook_out",
    "blocks.1.hook_out": "blocks.1.hook_resid_post",
    "blocks.0.attn.hook_out": "blocks.0.hook_attn_out",
}


def test_bridge_hook_names_are_aliases(eager):
    assert_bridge_aliases(eager.model, eager.inputs, BRIDGE_NAMES)


def test_every_analysis_runs(eager):
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)
    tier.every_analysis_runs(eager.model, scenes)
