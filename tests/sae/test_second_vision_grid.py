"""SAE tools at a second vision tower's points (DeepSeek-VL hybrid's SAM, `vision.high_res.*`): the
features are read, drawn, cropped and edited on SAM's own 8x8 patch grid, never on SigLIP's 4x4 one.
What they are checked against is Hugging Face's SAM hidden states, encoded by the SAE by hand."""

from __future__ import annotations

import copy

import pytest
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.data.schema import segmentation_info
from mmlens.interventions import TokenGroup
from mmlens.probing.batches import labelled_batches
from mmlens.sae import feature_maps, image_token_activations, sae_study, top_activations
from mmlens.sae.steering import FeatureEdit, feature_edit_hooks
from mmlens.testing.families.deepseek_vl_hybrid import tiny_deepseek_vl_hybrid

from test_splice import sae_at

SAM = "vision.high_res"
HOOK = f"{SAM}.blocks.1.hook_resid_post"  # a global block; hidden_states[2] in Hugging Face's tower
SIDE = 8  # SAM's patch grid per image (SigLIP's is 4x4)
BOX = 4  # a SAM patch's side on the layout's 32 px canvas, where every site's boxes lie


@pytest.fixture(scope="module")
def hybrid():
    hf_model, processor = tiny_deepseek_vl_hybrid(attn_implementation="eager")
    reference = copy.deepcopy(hf_model)
    model = HookedMLLM.from_hf(hf_model, processor)
    scenes = load_segmentation("scenes", split="train", n=4, image_size=32)
    sae = sae_at(HOOK, model.hf_model.config.high_res_vision_config.hidden_size)
    return model, reference, scenes, sae


@torch.no_grad()
def sam_features(reference, inputs, sae) -> torch.Tensor:
    """The SAE's features of Hugging Face's SAM hidden state after block 1: [image, row, col, d_sae]."""
    tower = reference.model.high_res_vision_model
    hidden = tower(inputs.extra["high_res_pixel_values"], output_hidden_states=True).hidden_states[2]
    assert hidden.shape[1:3] == (SIDE, SIDE)
    return sae.encode(hidden)


def prepared(model, scenes, n: int = 3):
    return model.prepare([s["image"] for s in scenes][:n], ["what is in the image ?"] * n)


@torch.no_grad()
def test_a_feature_map_at_a_sam_site_is_the_sae_of_hf_sam_states_on_sams_grid(hybrid):
    model, reference, scenes, sae = hybrid
    inputs = prepared(model, scenes)
    features = [1, 5, 9]
    maps = feature_maps(model, sae, inputs, features)
    by_hand = sam_features(reference, inputs, sae)[..., features]  # [image, 8, 8, features]
    assert maps.activations.shape == (3, SIDE * SIDE, 3) and maps.left_out == {}  # no CLS in SAM's tower
    for k in range(3):
        (segment,) = maps.segments[k]
        assert segment.values.shape == (3, SIDE, SIDE)
        torch.testing.assert_close(segment.values, by_hand[k].permute(2, 0, 1), atol=1e-5, rtol=0)
    painted = maps.painted(5)  # each 4x4 px box of the 32 px canvas takes its SAM patch's value
    assert painted.shape == (3, SIDE * BOX, SIDE * BOX)
    for row in range(SIDE):
        for col in range(SIDE):
            box = painted[:, row * BOX:(row + 1) * BOX, col * BOX:(col + 1) * BOX]
            torch.testing.assert_close(box, by_hand[:, row, col, 1, None, None].expand_as(box), atol=1e-5, rtol=0)
    assert by_hand[..., 1].unique().numel() > SIDE  # varied values: a SigLIP-grid map could not match


@torch.no_grad()
def test_top_crops_at_a_sam_site_are_boxes_on_the_high_res_patches(hybrid):
    model, reference, scenes, sae = hybrid
    features = sam_features(reference, prepared(model, scenes, 4), sae)  # [4, 8, 8, d_sae]
    best = features.flatten(1, 2).amax(1)  # [image, d_sae]
    chosen = (best > 0).all(0).nonzero().flatten()[:2].tolist()
    assert chosen
    found = top_activations(model, sae, scenes, chosen, k=2, batch_size=3)  # two batches: rows map back per batch
    for feature in chosen:
        order = best[:, feature].argsort(descending=True)[:2].tolist()
        assert [t.image for t in found[feature]] == order
        for top in found[feature]:
            flat = features[top.image, ..., feature].flatten()
            row, col = divmod(int(flat.argmax()), SIDE)
            assert top.activation == pytest.approx(float(flat.max()), abs=1e-5)
            assert top.cell == (row, col)
            assert top.box == (row * BOX, col * BOX, (row + 1) * BOX, (col + 1) * BOX)
            assert top.crop.shape == (BOX, BOX, 3)


@torch.no_grad()
def test_sam_site_activations_for_training_are_sam_patches_with_sam_labels(hybrid):
    model, reference, scenes, sae = hybrid
    tokens = image_token_activations(model, scenes, HOOK, batch_size=4)
    hidden = reference.model.high_res_vision_model(prepared(model, scenes, 4).extra["high_res_pixel_values"],
                                                   output_hidden_states=True).hidden_states[2]
    assert len(tokens.activations) == 4 * SIDE * SIDE
    torch.testing.assert_close(tokens.activations, hidden.flatten(0, 2), atol=1e-5, rtol=0)
    (batch,) = labelled_batches(model, scenes, range(4), batch_size=4)
    assert torch.equal(tokens.labels, batch.labels[SAM].labels.flatten())  # labelled on SAM's canvas


@torch.no_grad()
def test_a_feature_edit_at_a_sam_site_touches_only_the_sam_patches_under_the_tokens(hybrid):
    """Zeroing a feature for the top-left LLM token (of the 4x4 grid) edits the 2x2 SAM patches
    feeding it, as the cache of the edited feature shows."""
    model, reference, scenes, sae = hybrid
    inputs = prepared(model, scenes)
    untouched = sam_features(reference, inputs, sae)
    feature = int(untouched[:, :2, :2].flatten(0, 2).amin(0).argmax())
    untouched = untouched[..., feature]
    assert (untouched[:, :2, :2] > 0).all()  # fires at every patch it is zeroed at: the edit shows
    name = f"{HOOK}.hook_sae_acts_post"
    seen = {}

    def keep(acts, hook):
        seen["acts"] = acts.detach().clone()

    hooks = feature_edit_hooks(model, sae, inputs, [FeatureEdit(feature, TokenGroup.box(0, 0, 1, 1), "zero")])
    with model.saes(saes=[sae], use_error_term=True):
        model.run_with_hooks(inputs, fwd_hooks=[*hooks, (name, keep)], return_type=None)
    edited = seen["acts"][..., feature].view(3, SIDE, SIDE)
    zeroed = edited == 0
    assert zeroed[:, :2, :2].all()
    outside = torch.ones(SIDE, SIDE, dtype=torch.bool)
    outside[:2, :2] = False
    assert (untouched[:, outside] > 0).any()  # it fires outside too, and is left as it was there
    torch.testing.assert_close(edited[:, outside], untouched[:, outside], atol=1e-5, rtol=0)


def test_an_sae_study_at_a_sam_site_scores_features_on_sam_patches_and_their_labels(hybrid):
    """The study's held-out tokens are SAM's 64 patches per image, and each class's held-out IoU is
    that of the feature's active patches with the patches' own (high-res canvas) labels."""
    model, _, _, sae = hybrid
    scenes = load_segmentation("scenes", split="train", n=12, seed=1, image_size=32)
    study = sae_study(model, scenes, HOOK, sae=sae, n_boot=1000, batch_size=6)
    test_rows = [int(r) for r in study.test_rows]
    assert int(study.reconstruction.n_test_tokens[0]) == len(test_rows) * SIDE * SIDE
    held_out = image_token_activations(model, scenes.select(test_rows), HOOK, batch_size=6)
    with torch.no_grad():
        active = sae.encode(held_out.activations) > 0
    labelled = held_out.labels != held_out.ignore_index
    names = segmentation_info(scenes).class_names
    assert len(study.alignment) > 1
    for row in study.alignment.to_dict("records"):
        is_class = held_out.labels == names.index(row["class"])
        fires = active[:, row["feature"]]
        union = int((labelled & (fires | is_class)).sum())
        assert row["iou"] == pytest.approx(int((labelled & fires & is_class).sum()) / union)
