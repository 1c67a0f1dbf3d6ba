"""How the studies word their statistics, and the per-row seeds of random control groups: fast
checks on hand-made results (the studies themselves run in test_studies and test_recovery_heads)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from mmlens.errors import InputError
from mmlens.experiments import AnchorKnockoutResult, PositionStudyResult, RecoveryHeadsResult
from mmlens.experiments.anchors import refuse_empty
from mmlens.findings import ZERO_WIDTH
from mmlens.findings import effect_phrase as phrase
from mmlens.findings import verdict as side
from mmlens.experiments.recovery_heads import withhold_fractions
from mmlens.interventions import TokenGroup

from conftest import random_images


# ----------------------------------------------------------------- random controls seeded per row
def test_per_row_seeds_draw_each_row_from_its_own_seed(tiny_clip):
    inputs, corner = tiny_clip.inputs, TokenGroup.box(0, 0, 2, 2)
    a = TokenGroup.random_like(corner, seed=[11, 12, 13]).resolve(inputs)
    b = TokenGroup.random_like(corner, seed=[99, 12, 13]).resolve(inputs)
    assert torch.equal(a[1:], b[1:]) and not torch.equal(a[0], b[0])
    assert (a.sum(1) == corner.resolve(inputs).sum(1)).all() and not (a & corner.resolve(inputs)).any()
    with pytest.raises(InputError, match="2 per-row seeds for a batch of 3 rows"):
        TokenGroup.random_like(corner, seed=[1, 2]).resolve(inputs)


def test_a_rows_draw_does_not_depend_on_the_batch_it_is_in(tiny_clip):
    model, corner = tiny_clip.model, TokenGroup.box(0, 0, 2, 2)
    images, prompts = random_images(3), ["what is in the image ?", "how many", "the colour of the left shape is ?"]
    whole = model.prepare(images, prompts)
    other = model.prepare([images[2], images[0]], [prompts[2], prompts[0]])  # other rows, other padding
    drawn = TokenGroup.random_like(corner, seed=[5, 6, 7]).resolve(whole)
    again = TokenGroup.random_like(corner, seed=[7, 5]).resolve(other)
    by_image, by_image_again = whole.layout.by_image(drawn), other.layout.by_image(again)
    assert torch.equal(by_image[0], by_image_again[1]) and torch.equal(by_image[2], by_image_again[0])


# ----------------------------------------------------------------- wording
def test_a_zero_width_interval_is_no_interval_never_a_side_of_zero():
    assert side(0.05, 0.05) == ZERO_WIDTH and side(0.0, 0.0) == ZERO_WIDTH
    assert side(0.01, 0.05) == "above zero" and side(-0.05, -0.01) == "below zero"
    assert "no interval" in phrase(0.05, 0.05, 0.05) and "above" not in phrase(0.05, 0.05, 0.05)
    assert phrase(0.02, -0.01, 0.05).endswith("not distinguishable from zero")
    assert phrase(0.02, 0.01, 0.05) == "0.020 [0.010, 0.050]"


def test_an_empty_group_is_refused_by_name():
    with pytest.raises(InputError, match=r"the anchors \(box rows 9:10\) hold no token in any of the 3 images"):
        refuse_empty("anchors", "box rows 9:10", np.zeros(3, dtype=int), "pass other anchors")
    refuse_empty("anchors", "box rows 9:10", np.array([0, 1, 0]), "pass other anchors")  # one image is enough


def _recovery(gap, gap_low, gap_high) -> RecoveryHeadsResult:
    top_k = pd.DataFrame([{"k": 1, "heads": "L1H0", "effect": 0.1, "effect_low": 0.05, "effect_high": 0.15,
                           "fraction_restored": 0.87, "fraction_low": 0.60, "fraction_high": 2.16}])
    summary = {"clean_metric": 1.0, "corrupted_metric": 1.0 - gap, "gap": gap, "gap_low": gap_low,
               "gap_high": gap_high, "rank_correlation": 0.9, "n_images": 16, "n_selection_images": 8,
               "n_scoring_images": 8}
    return RecoveryHeadsResult(table=pd.DataFrame(), top_k=top_k, layers=[1], summary=summary, exact=np.zeros((1, 1, 8)),
                               attribution=None, settings={"corruption": "counterfactual", "top_k": 1})


def test_a_corruption_that_raises_the_metric_has_no_gap_to_restore():
    lines = _recovery(-0.2, -0.3, -0.1).findings()
    assert lines[1].startswith("the corruption raises the metric; there is no gap to restore")
    assert "restore 0.87" not in " ".join(lines) and "0.87" not in lines[1]
    assert "8 scoring images; heads chosen on 8 other images" in lines[0]
    frame = _recovery(-0.2, -0.3, -0.1).top_k
    assert withhold_fractions(frame, -0.3, -0.1)[["fraction_restored", "fraction_low", "fraction_high"]].isna().all().all()
    assert withhold_fractions(frame, 0.1, 0.3) is frame


def test_a_gap_without_width_is_not_worded_as_a_gap():
    lines = _recovery(0.05, 0.05, 0.05).findings()
    assert "no interval" in lines[0] and "not distinguishable" not in lines[0]
    assert lines[1].startswith("fractions of the gap restored are withheld") and "no interval" in lines[1]
    frame = _recovery(0.05, 0.05, 0.05).top_k
    assert withhold_fractions(frame, 0.05, 0.05).fraction_restored.isna().all()
    assert _recovery(0.2, 0.1, 0.3).findings()[1].startswith("top heads L1H0 restore 0.87 of the gap [0.60, 2.16]")


def _knockout(effect, low, high) -> AnchorKnockoutResult:
    effects = pd.DataFrame([{"comparison": "anchors - control", "hook": "blocks.3.hook_resid_post", "site": "L3",
                             "layer": 3, "metric": "target_accuracy", "effect": effect, "low": low, "high": high}])
    pairs = pd.DataFrame([{"name_a": "red_circle", "name_b": "red_square"}])
    return AnchorKnockoutResult(pairs=pairs, table=pd.DataFrame(), effects=effects, reference="adapter.hook_out",
                                layers=[0, 1, 2, 3], readouts=[SimpleNamespace(hook="blocks.3.hook_resid_post")],
                                anchors_per_image=3.0, targets_per_image=2.0, blocked_mass=0.0, control_anchor_share=0.5)


def test_anchor_knockout_words_a_zero_width_interval_as_none():
    line = _knockout(-0.05, -0.05, -0.05).findings()[1]
    assert "no interval" in line and "hurts more" not in line
    assert "hurts more" in _knockout(-0.05, -0.08, -0.02).findings()[1]
    assert "hurts less" in _knockout(0.05, 0.02, 0.08).findings()[1]


def _position(deficit, gain) -> PositionStudyResult:
    summary = pd.DataFrame([{"condition": c, "site": "L3", "early_deficit": d, "early_deficit_low": d - 0.02,
                             "early_deficit_high": d + 0.02} for c, d in (("causal", deficit), ("bidirectional", 0.0))])
    gains = pd.DataFrame([{"condition": "bidirectional", "site": "L3", "tokens": t, "gain_over_causal": g,
                           "low": g - 0.02, "high": g + 0.02} for t, g in (("early", gain), ("late", 0.0))])
    return PositionStudyResult(per_position=pd.DataFrame(), summary=summary, gains=gains, grid=(8, 8), sweeps={})


def test_position_study_words_a_difference_by_its_sign():
    deficit, gain = _position(-0.06, -0.05).findings()
    assert "causal -0.060 [-0.080, -0.040] (early tokens more accurate than late ones: no early-token deficit)" in deficit
    assert "bidirectional +0.000 [-0.020, +0.020], not distinguishable from zero" in deficit
    assert gain == "bidirectional gain on early tokens -0.050 [-0.070, -0.030] (bidirectional attention lowers " \
                   "early-token accuracy)"
    deficit, gain = _position(0.06, 0.05).findings()
    assert "(early tokens less accurate than late ones)" in deficit and "raises early-token accuracy" in gain
