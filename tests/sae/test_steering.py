"""Editing SAE features at token groups and attribution patching to features, on the tiny LLaVA."""

from __future__ import annotations

import pytest
import torch

from mmlens import HookedMLLM
from mmlens.errors import InputError
from mmlens.interventions import TokenGroup
from mmlens.interventions.patching_metrics import logit_difference
from mmlens.sae import FeatureEdit, feature_attribution, feature_edit_hooks, run_with_feature_edits
from mmlens.testing import tiny_llava

from conftest import random_images
from test_splice import sae_at

PROMPTS = ["what is in the image ?", "how many shapes ?"]


@pytest.fixture(scope="module")
def llava():
    model = HookedMLLM.from_hf(*tiny_llava())
    return model, model.prepare(random_images(2, sizes=((32, 32),)), PROMPTS)


@torch.no_grad()
def test_zeroing_a_feature_at_image_tokens_removes_exactly_its_decoder_contribution_there(llava) -> None:
    model, inputs = llava
    point, feature = "blocks.0.hook_resid_post", 9
    sae = sae_at(point, model.cfg.d_model)
    edited = run_with_feature_edits(model, sae, inputs, [FeatureEdit(feature, TokenGroup.image())])
    image = inputs.layout.image_token_mask().to(model.cfg.device)

    def by_hand(x, hook):
        contribution = sae.encode(x)[..., feature, None] * sae.W_dec[feature]
        return x - torch.where(image[..., None], contribution, torch.zeros_like(contribution))

    expected = model.run_with_hooks(inputs, fwd_hooks=[(point, by_hand)])
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=0)
    assert (edited - model(inputs)).abs().max() > 1e-4  # the feature fires at image tokens: the edit shows


@torch.no_grad()
def test_edits_reach_the_adapter_rows_and_vision_patches_of_the_group_only(llava) -> None:
    model, inputs = llava
    box = TokenGroup.box(0, 0, 2, 2)
    in_box = (inputs.layout.token_grid.cells < 2).all(1)  # the 4 of 16 cells in rows 0-1, cols 0-1
    for point, width, mode in (("adapter.hook_out", model.cfg.d_model, "set"),
                               ("vision.blocks.0.hook_resid_post", model.cfg.vision.d_model, "add")):
        sae = sae_at(point, width)
        name = f"{point}.hook_sae_acts_post"
        seen = {}
        hooks = [*feature_edit_hooks(model, sae, inputs, [FeatureEdit(3, box, mode, 2.5)]),
                 (name, lambda acts, hook: seen.__setitem__("edited", acts.clone()))]
        with model.saes(saes=[sae], use_error_term=True):
            model.run_with_hooks(inputs, fwd_hooks=hooks)
        _, cache = model.run_with_cache_with_saes(inputs, saes=[sae], use_error_term=True, names_filter=[name])
        before, after = (inputs.layout.gather(_stage(point), a) for a in (cache[name], seen["edited"]))
        expected = before.clone()
        expected[:, in_box, 3] = 2.5 if mode == "set" else before[:, in_box, 3] + 2.5
        torch.testing.assert_close(after, expected, atol=1e-6, rtol=0)


def test_feature_out_of_range_and_unknown_mode_are_refused(llava) -> None:
    model, inputs = llava
    sae = sae_at("adapter.hook_out", model.cfg.d_model)
    with pytest.raises(InputError, match="features \\[999\\]"):
        feature_edit_hooks(model, sae, inputs, [FeatureEdit(999)])
    with pytest.raises(InputError, match="mode"):
        FeatureEdit(1, mode="clamp")


def test_attribution_is_exact_where_the_metric_is_linear_in_the_features(llava) -> None:
    model, target = llava
    source = model.prepare(random_images(2, seed=5, sizes=((32, 32),)), PROMPTS)
    point = "ln_final.hook_normalized"  # the logits are linear in what follows it
    sae = sae_at(point, model.cfg.d_model)
    metric = logit_difference(5, 7, position=TokenGroup.last())
    found = feature_attribution(model, sae, source, target, metric)
    name = f"{point}.hook_sae_acts_post"
    with torch.no_grad():
        _, source_cache = model.run_with_cache_with_saes(source, saes=[sae], use_error_term=True, names_filter=[name])
        with model.saes(saes=[sae], use_error_term=True):
            patched = model.run_with_hooks(target, fwd_hooks=[(name, lambda acts, hook: source_cache[name])])
    rows = torch.arange(2)
    last = target.attention_mask.shape[1] - 1
    actual = (patched[rows, last, 5] - patched[rows, last, 7]) - found.target_metric
    torch.testing.assert_close(found.values.sum((1, 2)), actual, atol=1e-4, rtol=1e-4)
    assert actual.abs().min() > 1e-3


def test_attribution_to_image_tokens_keeps_the_group_only(llava) -> None:
    model, target = llava
    source = model.prepare(random_images(2, seed=5, sizes=((32, 32),)), PROMPTS)
    sae = sae_at("adapter.hook_out", model.cfg.d_model)
    metric = logit_difference(5, 7, position=TokenGroup.last())
    everywhere = feature_attribution(model, sae, source, target, metric)
    boxed = feature_attribution(model, sae, source, target, metric, group=TokenGroup.box(0, 0, 2, 2))
    in_box = (target.layout.token_grid.cells < 2).all(1)
    full, kept = everywhere.at_image_tokens(target), boxed.at_image_tokens(target)
    assert full.shape == (2, 16, sae.cfg.d_sae) and full.abs().sum() > 0
    torch.testing.assert_close(kept[:, in_box], full[:, in_box])
    assert torch.all(kept[:, ~in_box] == 0)


def _stage(point: str) -> str:
    return "vision" if point.startswith("vision.") else "adapter"
