"""The SAE study on the embedded model: features chosen on training scenes, scored on held-out
ones against random features, and ablated against frequency-matched features (paired intervals)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import InputError
from mmlens.findings import NOT_DISTINGUISHABLE
from mmlens.sae import sae_study

# the configuration docs/sae.md and examples/07 describe, on fewer scenes
STUDY = dict(architecture="topk", k=4, d_sae=128, steps=400, batch_size=256, lr=2e-3, n_boot=1000, seed=0)


@pytest.fixture(scope="module")
def study():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds contention
    try:
        model = HookedMLLM.from_pretrained("tiny-shapes-llava")
        scenes = load_segmentation("scenes", split="train", n=96, seed=0)
        return model, scenes, sae_study(model, scenes, **STUDY)
    finally:
        torch.set_num_threads(threads)


def test_split_by_image_and_reconstruction(study) -> None:
    _, scenes, result = study
    assert not set(result.train_rows) & set(result.test_rows)
    assert len(result.test_rows) == 24
    held = result.reconstruction.iloc[0]
    assert held["n_test_tokens"] == 24 * 64 and held["l0"] == 4.0
    assert held["variance_explained"] > 0.8


def test_aligned_features_beat_random_features_on_held_out_scenes(study) -> None:
    _, scenes, result = study
    table = result.alignment
    assert len(table) == 9  # every class on the training tokens, background included
    # chosen on training scenes, scored on held-out ones: well above random live features
    assert (table["difference_low"] > 0).all()
    assert (table["iou"] > 3 * table["random_iou"]).all()
    assert (table["iou_low"] <= table["iou"]).all() and (table["iou"] <= table["iou_high"]).all()
    # the shapes of one colour share a feature: the SAE found colours
    feature = dict(zip(table["class"], table["feature"]))
    assert feature["red_circle"] == feature["red_square"] and feature["green_square"] == feature["green_triangle"]


def test_ablation_is_paired_against_a_feature_as_frequent(study) -> None:
    _, _, result = study
    table = result.ablation.set_index("class")
    np.testing.assert_allclose(table["difference"], table["drop"] - table["matched_drop"], atol=1e-12)
    # the matched feature fires about as often as the aligned one on training tokens
    assert ((table["frequency"] - table["matched_frequency"]).abs() < 0.1 * table["frequency"]).all()
    assert table.loc["blue_ring", "verdict"] == "above zero" and table.loc["blue_ring", "difference_low"] > 0.2
    assert table.loc["red_square", "verdict"] == NOT_DISTINGUISHABLE
    sentences = [line for line in result.findings if line.startswith("red_square: zeroing")]
    assert sentences and sentences[0].endswith(NOT_DISTINGUISHABLE)


def test_bad_study_inputs_are_refused(study) -> None:
    model, scenes, _ = study
    with pytest.raises(InputError, match="unknown classes"):
        sae_study(model, scenes, classes=["purple_hexagon"], **STUDY)
    with pytest.raises(InputError, match="n_boot"):
        sae_study(model, scenes, **STUDY | {"n_boot": 10})
    with pytest.raises(InputError, match="vision site"):
        sae_study(model, scenes, probe_hook="vision.blocks.0.hook_resid_post", **STUDY)


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_a_given_sae_is_studied_as_it_is_and_left_unchanged(study) -> None:
    from mmlens.sae import SAE, SAEConfig
    from mmlens.sae.study import _on_device

    model, scenes, _ = study
    torch.manual_seed(0)
    given = SAE(SAEConfig("standard", model.cfg.llm.d_model, 48, metadata={"hook_name": "adapter.hook_out"}))
    before = {name: tensor.clone() for name, tensor in given.state_dict().items()}
    with pytest.raises(InputError, match=r"training keyword\(s\) d_sae, steps"):
        sae_study(model, scenes, sae=given, d_sae=64, steps=10)
    few = scenes.select(range(24))
    result = sae_study(model, few, sae=given, n_boot=1000, n_random_features=4)
    settings = result.training.settings
    assert (settings.architecture, settings.d_sae) == ("standard", 48)  # the given SAE's, not the defaults
    assert result.reconstruction.iloc[0][["architecture", "d_sae"]].tolist() == ["standard", 48]
    assert given.cfg.device == "cpu" and all(torch.equal(before[n], t) for n, t in given.state_dict().items())
    # on another device the study runs a copy: the caller's SAE is not moved (meta: no memory needed)
    moved = _on_device(given, "meta")
    assert moved is not given and moved.W_enc.is_meta and given.W_enc.device.type == "cpu" and given.cfg.device == "cpu"
