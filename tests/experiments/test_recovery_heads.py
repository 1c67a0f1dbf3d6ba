"""The recovery-heads study on the embedded model: heads ranked with intervals on selection
images, the top k scored together on other images, attribution agreement, recovery maps and
figures, and the inputs it refuses."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import InputError
from mmlens.experiments import find_recovery_heads
from mmlens.interventions import TokenGroup
from mmlens.probing import probe_sweep


@pytest.fixture(scope="module")
def shapes():
    return HookedMLLM.from_pretrained("tiny-shapes-llava")


@pytest.fixture(scope="module")
def sweep(shapes):
    scenes = load_segmentation("scenes", split="validation", n=100, seed=0)
    with torch.no_grad():
        return probe_sweep(shapes, scenes, sites=["adapter.hook_out", "blocks.1.hook_resid_post", "blocks.3.hook_resid_post"],
                           probe="ridge", progress=False, n_boot=1000)


@pytest.fixture(scope="module")
def counterfactual(shapes, sweep):
    return find_recovery_heads(shapes, sweep, corruption="counterfactual", n_images=16, n_boot=1000, n_maps=1, top_k=3)


def test_heads_are_ranked_with_intervals_and_the_top_k_check_agrees(shapes, sweep, counterfactual):
    result = counterfactual
    table = result.table
    n_layers, n_heads = shapes.cfg.n_layers, shapes.cfg.llm.n_heads
    assert len(table) == n_layers * n_heads and set(zip(table.layer, table["head"])) == {
        (l, h) for l in range(n_layers) for h in range(n_heads)}
    assert table.effect.is_monotonic_decreasing and list(table["rank"]) == list(range(1, len(table) + 1))
    assert ((table.effect_low <= table.effect) & (table.effect <= table.effect_high)).all()
    # the heads are ranked on one seeded half of the 16 images and scored on the other
    chose, scored = result.settings["selection_indices"], result.settings["scoring_indices"]
    assert len(chose) == len(scored) == 8 and not set(chose) & set(scored)
    assert sorted(chose + scored) == sorted(np.asarray(sweep.test_indices)[:16].tolist())
    assert result.exact.shape == (n_layers, n_heads, result.summary["n_selection_images"])
    best = table.iloc[0]
    assert best.effect == pytest.approx(result.exact[int(best.layer), int(best["head"])].mean())
    top_k = result.top_k
    assert ((top_k.effect_low <= top_k.effect) & (top_k.effect <= top_k.effect_high)).all()
    assert list(result.top_k.k) == [1, 2, 3] and result.top_heads == [tuple(map(int, r)) for r in table[["layer", "head"]].values[:3]]
    assert result.layers == sorted({l for l, _ in result.top_heads})
    # another scene is a large corruption: the probe margin drops, and the heads chosen on the
    # selection images restore part of it on the scoring images
    assert result.summary["gap"] > 0 and result.summary["gap_low"] > 0
    assert best.effect > 0 and top_k.effect_low.iloc[-1] > 0 and top_k.fraction_low.iloc[-1] > 0
    assert result.summary["rank_correlation"] > 0.5, "attribution must rank heads like exact patching"


def test_recovery_maps_and_figures(counterfactual):
    (example,) = counterfactual.maps
    assert example.image.shape[2] == 3 and example.image.dtype == np.uint8
    assert set(example.attention) == set(counterfactual.layers)
    for layer, attention in example.attention.items():
        assert attention.shape == example.grid and (attention >= 0).all() and attention.sum() <= 1 + 1e-5
    n_tokens = example.grid[0] * example.grid[1]
    assert example.queries and all(0 <= t < n_tokens for t in example.queries + example.anchors)
    figures = counterfactual.figures()
    heatmaps = figures["head_heatmap"]
    assert [type(t) for t in heatmaps.data] == [go.Heatmap, go.Heatmap]
    np.testing.assert_allclose(np.asarray(heatmaps.data[0].z, dtype=float),
                               counterfactual.table.pivot(index="layer", columns="head", values="effect").to_numpy())
    recovery = figures["recovery_map_0"]
    assert sum(isinstance(t, go.Image) for t in recovery.data) == len(example.attention)
    assert "<div" in recovery.to_html(include_plotlyjs=False) and "<div" in heatmaps.to_html(include_plotlyjs=False)


def test_recovery_blocked_knockout_is_verified_and_study_runs(shapes, sweep):
    result = find_recovery_heads(shapes, sweep, corruption="recovery_blocked", window=[1, 2, 3], n_images=8,
                                 n_boot=1000, n_maps=0, attribution=False, readout="blocks.3.hook_resid_post")
    assert result.settings["window"] == [1, 2, 3] and result.attribution is None and not result.maps
    # blocking attention from layer 1 on leaves layer 0 untouched: its heads' clean output is the
    # corrupted one, so patching them restores nothing at all
    layer0 = result.table[result.table.layer == 0]
    assert np.allclose(layer0.effect, 0.0, atol=1e-5)
    assert (result.table.effect.abs() > 1e-3).any()


def test_bad_study_settings_are_clear_errors(shapes, sweep):
    with pytest.raises(ValueError, match="corruption must be one of"):
        find_recovery_heads(shapes, sweep, corruption="noise")
    with pytest.raises(ValueError, match="no probe at"):
        find_recovery_heads(shapes, sweep, readout="blocks.2.hook_resid_post")
    with pytest.raises(ValueError, match="tokens must be"):
        find_recovery_heads(shapes, sweep, tokens="everything", n_images=4)


def test_findings_withhold_fractions_of_a_null_gap(counterfactual):
    from dataclasses import replace

    from mmlens.experiments.recovery_heads import withhold_fractions

    # another scene opens a gap whose interval excludes zero: fractions restored are reported
    assert counterfactual.summary["gap_excludes_zero"]
    assert not counterfactual.top_k.fraction_restored.isna().any()
    lines = counterfactual.findings()
    assert "restore" in lines[1] and "not distinguishable" not in lines[0]
    # the same tables under a gap whose interval includes zero: every fraction is withheld
    for frame in (counterfactual.table, counterfactual.top_k):
        withheld = withhold_fractions(frame, -0.01, 0.02)
        assert withheld[["fraction_restored", "fraction_low", "fraction_high"]].isna().all().all()
        assert withheld.effect.equals(frame.effect) and not frame.fraction_restored.isna().any()  # the rest kept
        assert withhold_fractions(frame, 0.01, 0.02) is frame
    null = replace(counterfactual, summary={**counterfactual.summary, "gap": 0.004, "gap_low": -0.01, "gap_high": 0.02,
                                            "gap_excludes_zero": False},
                   top_k=withhold_fractions(counterfactual.top_k, -0.01, 0.02))
    lines = null.findings()
    assert "gap 0.004 [-0.010, 0.020], not distinguishable from zero" in lines[0]
    assert lines[1].startswith("fractions of the gap restored are withheld")
    page = null._repr_html_()
    assert "RecoveryHeadsResult" in page and "withheld" in page and "<table" in page


def test_heads_are_chosen_on_selection_images_and_scored_on_others(shapes, sweep):
    held_out = np.asarray(sweep.test_indices)
    chooser, first, second = held_out[:8], held_out[8:14], held_out[14:20]

    def study(selection, images):
        return find_recovery_heads(shapes, sweep, corruption="recovery_blocked", selection_images=selection,
                                   images=images, top_k=2, n_maps=0, attribution=False)

    one, other = study(chooser, first), study(chooser, second)
    # the choice is made on the selection images alone: other scoring images, the same heads and table
    assert one.top_heads == other.top_heads
    pd.testing.assert_frame_equal(one.table, other.table)
    assert one.settings["selection_indices"] == chooser.tolist() and one.settings["scoring_indices"] == first.tolist()
    assert one.summary["n_selection_images"] == 8 and one.summary["n_scoring_images"] == 6
    # ... while the top-k effect is measured on the scoring images: the best head's effect there is
    # what a study choosing on those very images reports for that head alone
    assert not np.allclose(one.top_k.effect, other.top_k.effect)
    swapped = study(first, chooser)
    layer, head = one.top_heads[0]
    alone = swapped.table[(swapped.table.layer == layer) & (swapped.table["head"] == head)].effect.iloc[0]
    assert one.top_k.effect.iloc[0] == pytest.approx(alone, abs=1e-5)
    assert one.summary["gap"] == pytest.approx(swapped.summary["selection_gap"], abs=1e-6)


def test_scoring_images_the_probes_were_trained_on_are_refused(shapes, sweep):
    with pytest.raises(InputError, match="trained the sweep's probes"):
        find_recovery_heads(shapes, sweep, images=np.asarray(sweep.train_indices)[:8])
    held_out = np.asarray(sweep.test_indices)
    with pytest.raises(InputError, match="both in selection_images and among the scored images"):
        find_recovery_heads(shapes, sweep, images=held_out[:6], selection_images=held_out[4:8])
    with pytest.raises(InputError, match="n_boot=200"):
        find_recovery_heads(shapes, sweep, n_boot=200)


def test_token_groups_no_image_holds_are_refused_by_name(shapes, sweep):
    nowhere = TokenGroup.box(100, 100, 101, 101)  # outside the 8 x 8 grid: empty in every image
    with pytest.raises(InputError, match=r"scored tokens .*box rows 100:101 cols 100:101.* no token in any"):
        find_recovery_heads(shapes, sweep, tokens=nowhere, n_images=4, n_maps=0, attribution=False)
    with pytest.raises(InputError, match=r"the anchors \(box rows 100:101 cols 100:101\) hold no token in any"):
        find_recovery_heads(shapes, sweep, corruption="anchors_removed", anchors=nowhere, tokens="all", n_images=4,
                            n_maps=0, attribution=False)
