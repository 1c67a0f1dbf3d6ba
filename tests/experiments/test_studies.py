"""The anchor-knockout and position studies on the embedded model: controls, intervals, proofs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation, lookalike_pairs
from mmlens.errors import InputError
from mmlens.experiments import anchor_knockout, conflicting_pairs, position_study
from mmlens.interventions import GroupContext, TokenGroup, bidirectional_image_attention
from mmlens.probing import probe_sweep
from mmlens.probing.batches import labelled_batches
from mmlens.viz import plot_position_curve, plot_position_heatmap


@pytest.fixture(scope="module")
def shapes():
    torch.set_grad_enabled(False)
    yield HookedMLLM.from_pretrained("tiny-shapes-llava")
    torch.set_grad_enabled(True)


@pytest.fixture(scope="module")
def scenes():
    return load_segmentation("scenes", split="validation", n=120, seed=0)


@pytest.fixture(scope="module")
def sweep(shapes, scenes):
    return probe_sweep(shapes, scenes, sites=["adapter.hook_out"] + [f"blocks.{l}.hook_resid_post" for l in range(4)],
                       probe="ridge", progress=False, n_boot=1000)


def test_probe_groups_split_labelled_image_tokens_by_the_probes_verdict(shapes, sweep, scenes):
    batch = next(labelled_batches(shapes, scenes, sweep.test_indices[:6]))
    inputs, labels = batch.inputs, batch.labels["llm"]
    hook = "blocks.1.hook_resid_post"
    probe = sweep.probes[("model", hook)]
    context = GroupContext(token_labels=labels.labels, model=shapes, ignore_index=sweep.ignore_index)
    right = TokenGroup.probe_correct(probe, hook).resolve(inputs, context)
    wrong = TokenGroup.probe_wrong(probe, hook).resolve(inputs, context)
    assert not (right & wrong).any() and right.any() and wrong.any()
    _, cache = shapes.run_with_cache(inputs, names_filter=hook)
    for k, span in enumerate(inputs.layout.spans):
        predicted = probe.predict(cache[hook][span.row, span.positions])
        truth = labels.labels[k]
        assert torch.equal(right[span.row, span.positions], (predicted == truth) & labels.valid[k])
        assert torch.equal((right | wrong)[span.row, span.positions], labels.valid[k])
    assert right.sum() + wrong.sum() == labels.valid.sum()


def test_the_most_conflicting_pairs_are_the_lookalike_classes(sweep):
    pairs = conflicting_pairs(sweep, "adapter.hook_out", n_pairs=2)
    lookalike = {frozenset(p) for p in lookalike_pairs(8)}
    assert {frozenset((a, b)) for a, b in zip(pairs.name_a, pairs.name_b)} <= lookalike
    assert pairs.confusion_rate.is_monotonic_decreasing and "background" not in set(pairs.name_a) | set(pairs.name_b)
    with pytest.raises(KeyError, match="probed sites"):
        conflicting_pairs(sweep, "blocks.9.hook_resid_post")
    with pytest.raises(ValueError, match="unknown class 'sky' in exclude"):
        conflicting_pairs(sweep, "adapter.hook_out", exclude=["sky"])


def test_anchor_knockout_takes_effect_and_has_a_matched_control(shapes, sweep):
    result = anchor_knockout(shapes, sweep, n_control=2, n_boot=1000)
    assert result.blocked_mass == 0.0 and result.layers == [0, 1, 2, 3]
    assert 0 < result.control_anchor_share < 1
    assert result.anchors_per_image > 0 and result.targets_per_image > 0
    table = result.table.set_index(["condition", "hook"])
    # at the reference nothing has been edited yet: identical, and targets are wrong by definition
    reference = table.xs("adapter.hook_out", level="hook")
    assert reference.miou.nunique() == 1 and (reference.target_accuracy == 0).all()
    later = table.xs("blocks.3.hook_resid_post", level="hook")
    assert later.loc["anchors", "miou"] != later.loc["clean", "miou"]
    assert later.loc["control", "miou"] != later.loc["clean", "miou"]
    for metric in ("target_accuracy", "pair_miou", "miou"):
        assert (result.table[f"{metric}_low"] <= result.table[metric] + 1e-12).all()
        assert (result.table[metric] <= result.table[f"{metric}_high"] + 1e-12).all()
    zero = result.effects[result.effects.hook == "adapter.hook_out"]
    assert (zero.effect == 0).all() and (zero.low == 0).all() and (zero.high == 0).all()
    assert len(result.figure().data) == 6  # three conditions, each a line and a band


def test_anchor_knockout_rejects_a_window_after_the_last_layer(shapes, sweep):
    with pytest.raises(ValueError, match="no LLM layer comes after"):
        anchor_knockout(shapes, sweep, reference="blocks.3.hook_resid_post")


def test_position_study_conditions_and_deficits(shapes, scenes):
    study = position_study(shapes, scenes, probe="ridge", n_boot=1000,
                           sites=["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"])
    n_test, n_tokens = study._scored.shape
    assert n_tokens == 64 and study.grid == (8, 8)
    assert len(study.per_position) == 3 * 3 * 64  # conditions x (adapter + 2 sites) x positions
    hits = study._hits
    # the adapter output comes before any attention: the causal probes read it identically in both runs
    assert np.array_equal(hits[("causal", "adapter.hook_out")], hits[("causal_probe_on_bidirectional", "adapter.hook_out")])
    # ... and the probe refitted there under bidirectional attention is the same probe (same features)
    assert np.array_equal(hits[("causal", "adapter.hook_out")], hits[("bidirectional", "adapter.hook_out")])
    assert not np.array_equal(hits[("causal", "blocks.3.hook_resid_post")], hits[("bidirectional", "blocks.3.hook_resid_post")])
    summary = study.summary.set_index(["condition", "hook"])
    assert (summary.loc[("causal", "adapter.hook_out")].recovery_deficit == 0)
    assert np.isfinite(summary.early_deficit).all()
    assert set(study.gains.tokens) == {"early", "late"}
    assert study.settings["excluded_classes"] == ["background"]
    assert len(plot_position_heatmap(study).data) == 9 and len(plot_position_curve(study, by="token").data) == 6
    with pytest.raises(ValueError, match="early_fraction"):
        position_study(shapes, scenes, early_fraction=0.9)


def test_a_bidirectional_model_is_forced_causal_on_request(scenes):
    twin = HookedMLLM.from_pretrained("tiny-shapes-llava-bidir")
    inputs = twin.prepare([scenes[0]["image"], scenes[1]["image"]], "")
    native = twin(inputs)
    with twin.using_image_attention("causal"):
        causal = twin(inputs)
        with bidirectional_image_attention(twin, inputs):
            reopened = twin(inputs)
    assert twin.image_attention == "bidirectional"
    assert (native - causal).abs().max() > 1e-4
    torch.testing.assert_close(reopened, native, atol=1e-5, rtol=0)


def test_study_results_word_their_findings_from_intervals(shapes, sweep, scenes):
    from mmlens.findings import excludes_zero

    result = anchor_knockout(shapes, sweep, n_control=1, n_boot=1000)
    last = result.effects[(result.effects.metric == "target_accuracy") & (result.effects.comparison == "anchors - control")
                          & (result.effects.hook == result.readouts[-1].hook)].iloc[0]
    line = result.findings()[1]
    assert f"{last.effect:+.3f} [{last.low:+.3f}, {last.high:+.3f}]" in line
    assert ("not distinguishable from zero" in line) == (not excludes_zero(last.low, last.high))
    assert "AnchorKnockoutResult" in result._repr_html_()
    study = position_study(shapes, scenes, probe="ridge", n_boot=1000, sites=["blocks.3.hook_resid_post"])
    gain = study.gains[(study.gains.condition == "bidirectional") & (study.gains.tokens == "early")].iloc[-1]
    line = study.findings()[1]
    assert line.startswith("bidirectional gain on early tokens")
    assert ("not distinguishable from zero" in line) == (not excludes_zero(gain.low, gain.high))
    assert "PositionStudyResult" in study._repr_html_()


def test_too_few_bootstrap_resamples_are_refused_before_any_work(shapes, sweep, scenes):
    with pytest.raises(InputError, match="n_boot=200.*at least 1000"):
        anchor_knockout(shapes, sweep, n_boot=200)
    with pytest.raises(InputError, match="n_boot=200"):
        position_study(shapes, scenes, n_boot=200)


def test_anchor_knockout_does_not_depend_on_the_batch_size(shapes, sweep):
    # the control's random tokens are seeded per image (study seed, dataset row, control number),
    # so batching the same images differently gives the same per-image counts, hence the same tables
    images = sweep.test_indices[:16]
    results = [anchor_knockout(shapes, sweep, images=images, n_control=2, batch_size=size) for size in (4, 8, 16)]
    for other in results[1:]:
        pd.testing.assert_frame_equal(other.effects, results[0].effects, check_exact=True)
        pd.testing.assert_frame_equal(other.table, results[0].table, check_exact=True)
        assert other.control_anchor_share == results[0].control_anchor_share
    # and another study seed draws another control
    reseeded = anchor_knockout(shapes, sweep, images=images, n_control=2, batch_size=8, seed=1)
    assert not reseeded.table.equals(results[0].table)


def test_anchor_knockout_refuses_anchors_that_no_image_holds(shapes, sweep, scenes):
    a, b = 1, 2  # a pair of classes absent from the chosen images: no anchors, no targets
    absent = [int(i) for i in sweep.test_indices if not np.isin(np.asarray(scenes[int(i)]["mask"]), [a, b]).any()][:4]
    assert len(absent) == 4
    names = sweep.class_names
    pairs = pd.DataFrame([{"class_a": a, "class_b": b, "name_a": names[a], "name_b": names[b], "confusion_rate": 0.1,
                           "pixels_a": 1, "pixels_b": 1}])
    with pytest.raises(InputError, match=rf"anchors \(tokens of {names[a]}/{names[b]} .*no token in any of the 4 images"):
        anchor_knockout(shapes, sweep, pairs=pairs, images=absent, n_control=1)


def test_position_study_refuses_to_exclude_every_class(shapes, scenes):
    with pytest.raises(InputError, match="excludes every class"):
        position_study(shapes, scenes, exclude=list(range(9)))
