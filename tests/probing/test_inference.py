"""Findings a reviewer can trust (issue 23): what is chosen is chosen on training images, the
numbers do not move with batch size or threads, comparisons are paired, and degenerate
statistics are refused or worded as what they are."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import concatenate_datasets

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import InputError
from mmlens.findings import ZERO_WIDTH, effect_phrase, verdict
from mmlens.probing import compare_sweeps, combine_seeds, comparison_findings, probe_sweep
from mmlens.probing.metrics import miou_from_counts
from mmlens.probing.penalty import RidgeFolds
from mmlens.probing.split import split_images
from mmlens.probing.summary import summary_findings
from mmlens.resampling import bootstrap_indices

ROOT = Path(__file__).parents[2]
SITES = ["adapter.hook_in", "adapter.hook_out", "blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]


@pytest.fixture(scope="module")
def shapes():
    return HookedMLLM.from_pretrained("tiny-shapes-llava")


@pytest.fixture(scope="module")
def scenes():
    return load_segmentation("scenes", split="validation", n=64, image_size=64)


@pytest.fixture(scope="module")
def sweep(shapes, scenes):
    return probe_sweep(shapes, scenes, sites=SITES, probe="ridge", progress=False, batch_size=16)


def benchmark(name: str):
    """A script of benchmarks/ as a module: the docs quote what its functions print."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ penalties chosen on training images
def test_ridge_cross_validation_equals_held_out_error_computed_from_the_features():
    torch.manual_seed(0)
    x = torch.randn(300, 5) * torch.tensor([1.0, 3.0, 0.2, 5.0, 1.0]) + 2
    y = (x[:, 0] + x[:, 3] > 4).long() + (x[:, 1] > 2).long()
    fold = torch.arange(300) % 3
    folds = RidgeFolds(5, 3, 1, 3)
    folds.update(x, fold, y)
    alphas = (1e-3, 1e-1, 10.0)
    choice = folds.choose(alphas)
    by_hand = []
    for alpha in alphas:
        error = 0.0
        for held in range(3):
            train, test = x[fold != held].double(), x[fold == held].double()
            mean, scale = train.mean(0), train.std(0, unbiased=False)
            z = (train - mean) / scale
            onehot = torch.nn.functional.one_hot(y[fold != held], 3).double()
            n = len(z)
            zc = z - z.mean(0)
            weight = torch.linalg.solve(zc.T @ zc / n + alpha * torch.eye(5, dtype=torch.float64),
                                        zc.T @ (onehot - onehot.mean(0)) / n)
            predicted = ((test - mean) / scale) @ weight + onehot.mean(0)
            error += float(((predicted - torch.nn.functional.one_hot(y[fold == held], 3).double()) ** 2).sum())
        by_hand.append(error / 300)
    np.testing.assert_allclose(choice.losses, by_hand, rtol=1e-9)
    assert choice.chosen == alphas[int(np.argmin(by_hand))]


def test_penalties_do_not_depend_on_the_test_images(shapes, scenes, sweep):
    _, test = split_images(len(scenes), 0.25, 0)
    others = load_segmentation("scenes", split="validation", n=len(test), image_size=64, seed=7)
    # the same training images, other test images at the same rows
    rows = np.arange(len(scenes))
    source = np.where(np.isin(rows, test), len(scenes) + np.searchsorted(test, rows), rows)
    swapped = concatenate_datasets([scenes, others]).select(source.tolist())
    again = probe_sweep(shapes, swapped, sites=SITES, probe="ridge", progress=False, batch_size=16)
    pd.testing.assert_frame_equal(again.penalties, sweep.penalties)
    for key, probe in sweep.probes.items():
        assert torch.equal(again.probes[key].weight, probe.weight), key
    assert not np.allclose(again.table.miou, sweep.table.miou)  # the scores did change
    assert again.summary().loc["recovery_layer", "value"] == sweep.summary().loc["recovery_layer", "value"] == 3


def test_the_chosen_penalty_is_the_grids_lowest_cross_validated_loss_and_recorded(sweep):
    for (condition, hook), rows in sweep.penalties.groupby(["condition", "hook"]):
        assert rows.chosen.sum() == 1
        assert rows.loc[rows.chosen, "candidate"].item() == rows.loc[rows.cv_loss.idxmin(), "candidate"]
        assert sweep.table.set_index(["condition", "hook"]).loc[(condition, hook), "penalty"] == \
            rows.loc[rows.chosen, "candidate"].item()
    assert len(set(sweep.penalties.candidate)) == 6  # the default ridge grid, 1e-5 .. 1


def test_a_fixed_penalty_is_used_as_given(shapes, scenes):
    fixed = probe_sweep(shapes, scenes, sites=SITES[:2], probe="ridge", alpha=0.01, progress=False, sensitivity=False)
    assert set(fixed.table.penalty) == {0.01}
    assert fixed.penalties.cv_loss.isna().all()


def test_logistic_cross_validation_refits_the_chosen_penalty_on_all_training_images(shapes, scenes):
    kwargs = dict(sites=["adapter.hook_out"], probe="logistic", progress=False, max_train_tokens_per_image=16)
    chosen = probe_sweep(shapes, scenes, l2s=(1e-3, 1e-1), **kwargs)
    penalties = chosen.penalties
    assert len(penalties) == 2 and penalties.cv_loss.notna().all()
    best = float(penalties.loc[penalties.cv_loss.idxmin(), "candidate"])
    fixed = probe_sweep(shapes, scenes, l2=best, **kwargs)
    key = ("model", "adapter.hook_out")
    assert torch.equal(chosen.probes[key].weight, fixed.probes[key].weight)  # the same fit, on the same tokens


def test_sensitivity_refits_a_decade_either_side_at_the_summarys_sites(sweep):
    table = sweep.table.set_index(["condition", "hook"])
    for hook in ("adapter.hook_in", "adapter.hook_out", "blocks.3.hook_resid_post"):
        chosen = table.loc[("model", hook), "penalty"]
        assert table.loc[("penalty/10", hook), "penalty"] == pytest.approx(chosen / 10)
        assert table.loc[("penalty*10", hook), "penalty"] == pytest.approx(chosen * 10)
    assert ("penalty/10", "blocks.1.hook_resid_post") not in table.index
    summary = sweep.summary()
    assert {"drop_at_adapter (penalty/10)", "recovery_in_llm (penalty*10)"} <= set(summary.index)


def test_findings_say_when_a_conclusion_depends_on_the_penalty():
    rows = {"adapter_in_miou": (0.5, 0.45, 0.55), "adapter_out_miou": (0.45, 0.4, 0.5),
            "drop_at_adapter": (0.05, 0.01, 0.09), "recovery_layer_miou": (0.46, 0.4, 0.5),
            "recovery_in_llm": (0.01, -0.01, 0.03), "fraction_recovered": (0.2, -0.2, 0.6), "recovery_layer": (3, np.nan, np.nan),
            "drop_at_adapter (penalty/10)": (0.01, -0.01, 0.03), "recovery_in_llm (penalty/10)": (0.0, -0.02, 0.02),
            "drop_at_adapter (penalty*10)": (0.06, 0.02, 0.1), "recovery_in_llm (penalty*10)": (0.0, -0.02, 0.02)}
    summary = pd.DataFrame([{"statistic": k, "value": v, "low": lo, "high": hi} for k, (v, lo, hi) in rows.items()])
    lines = summary_findings(summary.set_index("statistic"))
    assert any("The drop at the adapter depends on the probe penalty: chosen penalties: above zero; penalty/10: "
               "not distinguishable from zero; penalty*10: above zero." in line for line in lines)
    assert any("The recovery in the LLM reads the same a decade either side" in line for line in lines)


# ------------------------------------------------------------------ the same numbers at any batch size or thread count
def test_findings_and_numbers_do_not_depend_on_batch_size_or_threads(shapes, scenes, sweep):
    threads = torch.get_num_threads()
    runs = {}
    try:
        for batch_size, n_threads in ((8, threads), (32, threads), (16, 1)):
            torch.set_num_threads(n_threads)
            runs[(batch_size, n_threads)] = probe_sweep(shapes, scenes, sites=SITES, probe="ridge", progress=False,
                                                        batch_size=batch_size, control="shuffled_labels")
    finally:
        torch.set_num_threads(threads)
    reference = probe_sweep(shapes, scenes, sites=SITES, probe="ridge", progress=False, batch_size=16,
                            control="shuffled_labels")
    for other in runs.values():
        assert other.findings() == reference.findings()
        np.testing.assert_allclose(other.table.miou, reference.table.miou, atol=1e-4)
        pd.testing.assert_frame_equal(other.penalties[["condition", "hook", "chosen"]],
                                      reference.penalties[["condition", "hook", "chosen"]])


# ------------------------------------------------------------------ paired comparisons and seeds
def test_paired_comparison_equals_a_hand_written_paired_bootstrap(shapes, scenes, sweep):
    from mmlens import HookedMLLM as Hooked

    twin = Hooked.from_pretrained("tiny-shapes-llava-bidir")
    other = probe_sweep(twin, scenes, sites=SITES, probe="ridge", progress=False, batch_size=16)
    table = compare_sweeps(sweep, other, names=("causal", "bidir"), n_boot=1000, seed=3)
    resamples = bootstrap_indices(len(sweep.test_indices), 1000, 3)

    def recovery(s, index):
        def miou(hook):
            return miou_from_counts(np.stack(s.scores[("model", hook)].per_image)[index].sum(0))
        return miou("blocks.3.hook_resid_post") - miou("adapter.hook_out")

    diffs = [recovery(sweep, idx) - recovery(other, idx) for idx in resamples]
    row = table.loc["recovery_in_llm"]
    assert row.difference == pytest.approx(recovery(sweep, slice(None)) - recovery(other, slice(None)))
    assert (row.low, row.high) == pytest.approx((np.percentile(diffs, 2.5), np.percentile(diffs, 97.5)))
    lines = comparison_findings(table)
    assert lines[1].startswith(f"The recovery in the LLM, causal minus bidir on the same {len(sweep.test_indices)} images")
    with pytest.raises(InputError, match="different test images"):
        compare_sweeps(sweep, probe_sweep(shapes, scenes, sites=SITES, probe="ridge", progress=False, seed=1))


def test_seeds_combine_into_one_interval_covering_both(shapes, scenes, sweep):
    second = probe_sweep(shapes, scenes, sites=SITES, probe="ridge", progress=False, seed=1)
    combined = combine_seeds([sweep, second])
    drops = [s.summary().loc["drop_at_adapter", "value"] for s in (sweep, second)]
    row = combined.loc["drop_at_adapter"]
    assert row.value == pytest.approx(np.mean(drops))
    assert [row["seed 0"], row["seed 1"]] == pytest.approx(drops)
    assert row.low <= min(drops) and row.high >= max(drops)
    with pytest.raises(InputError, match="at least two"):
        combine_seeds([sweep])


# ------------------------------------------------------------------ layers, ceilings, degenerate statistics
def test_simultaneous_intervals_over_layers_cover_95_percent_of_resamples_jointly(sweep):
    layers = sweep.layer_recoveries()
    assert list(layers.layer) == [1, 3]

    def miou(hook, index):
        return miou_from_counts(np.stack(sweep.scores[("model", hook)].per_image)[index].sum(0))

    gains = np.array([[miou(h, idx) - miou("adapter.hook_out", idx) for idx in sweep.bootstrap]
                      for h in layers.hook])  # [layers, n_boot]
    inside = (gains >= layers.simultaneous_low.to_numpy()[:, None]) & (gains <= layers.simultaneous_high.to_numpy()[:, None])
    assert inside.all(axis=0).mean() >= 0.95  # every layer at once, not each layer on its own
    assert inside.all(axis=0).mean() < 0.97  # and no wider than the max-statistic needs
    assert any("probed LLM layers (simultaneous 95% intervals)" in line for line in sweep.findings())


def test_the_token_resolution_ceiling_is_each_box_painted_with_its_majority_class(shapes, scenes, sweep):
    from mmlens.probing.batches import labelled_batches
    from mmlens.probing.metrics import SegmentationScores

    scores = SegmentationScores(len(sweep.class_names), sweep.ignore_index)
    for batch in labelled_batches(shapes, scenes, sweep.test_indices, batch_size=64):
        labels = batch.labels["llm"]
        scores.add(labels.fractions.argmax(-1), labels.labels, labels.valid, batch.masks, batch.inputs.layout.pixels("llm"))
    assert sweep.ceilings["llm"].miou == pytest.approx(scores.miou)
    table = sweep.table[sweep.table.condition == "model"]
    assert (table.ceiling == scores.miou).all()
    assert np.allclose(table.miou_of_ceiling, table.miou / scores.miou)
    assert (table.miou < table.ceiling).all()


@pytest.mark.parametrize("n_boot", [1, 200, 999])
def test_too_few_resamples_are_refused(shapes, scenes, n_boot):
    with pytest.raises(InputError, match="at least 1000 bootstrap resamples"):
        probe_sweep(shapes, scenes, sites=SITES[:2], probe="ridge", progress=False, n_boot=n_boot)


def test_a_zero_width_interval_is_never_a_finding():
    assert verdict(0.076, 0.076) == ZERO_WIDTH
    assert effect_phrase(0.076, 0.076, 0.076).endswith(ZERO_WIDTH)
    rows = {"adapter_in_miou": (0.5, 0.5, 0.5), "adapter_out_miou": (0.4, 0.4, 0.4),
            "drop_at_adapter": (0.1, 0.1, 0.1), "recovery_layer_miou": (0.45, 0.45, 0.45),
            "recovery_in_llm": (0.05, 0.05, 0.05), "fraction_recovered": (0.5, 0.5, 0.5), "recovery_layer": (3, np.nan, np.nan)}
    summary = pd.DataFrame([{"statistic": k, "value": v, "low": lo, "high": hi} for k, (v, lo, hi) in rows.items()])
    lines = summary_findings(summary.set_index("statistic"))
    assert lines[0].startswith("No drop at the adapter can be claimed") and ZERO_WIDTH in lines[0]
    assert lines[1].startswith("No recovery in the LLM can be claimed")


def test_a_loss_in_the_llm_is_worded_by_its_sign():
    rows = {"adapter_in_miou": (0.5, 0.45, 0.55), "adapter_out_miou": (0.45, 0.4, 0.5),
            "drop_at_adapter": (0.05, 0.01, 0.09), "recovery_layer_miou": (0.37, 0.3, 0.4),
            "recovery_in_llm": (-0.084, -0.089, -0.001), "fraction_recovered": (-1.6, -3.0, -0.1),
            "recovery_layer": (3, np.nan, np.nan)}
    summary = pd.DataFrame([{"statistic": k, "value": v, "low": lo, "high": hi} for k, (v, lo, hi) in rows.items()])
    assert summary_findings(summary.set_index("statistic"))[1].startswith("The LLM loses segmentation, it does not recover it")


def test_a_recovery_layer_the_sweep_did_not_probe_is_refused(shapes, scenes):
    with pytest.raises(InputError, match=r"recovery_layer=2 is not among the sweep's LLM sites \(layers \[1, 3\]\)"):
        probe_sweep(shapes, scenes, sites=SITES, probe="ridge", progress=False, recovery_layer=2)


def test_an_image_repeated_across_the_split_is_refused(shapes, scenes):
    train, test = split_images(len(scenes), 0.25, 0)
    rows = np.arange(len(scenes))
    rows[test[0]] = train[0]  # a training scene again as a test scene
    with pytest.raises(InputError, match="across the split|duplicate|copies"):
        probe_sweep(shapes, scenes.select(rows.tolist()), sites=SITES[:2], probe="ridge", progress=False)


@pytest.mark.parametrize("script, arguments", [("twins", ("v1", 300)), ("penalties", ("tiny-shapes-llava", 300))])
def test_the_tables_quoted_in_the_docs_are_what_the_scripts_print(script, arguments):
    page = (ROOT / "docs" / "statistics.md").read_text()
    for row in benchmark(script).table_rows(*arguments):
        assert row in page, row


def test_the_control_task_labels_each_visual_type_with_one_fixed_class_and_is_scored_on_it(shapes, scenes):
    from PIL import Image

    from mmlens.probing.batches import N_VISUAL_TYPES, colour_types, labelled_batches

    pixels = np.array([[[0, 0, 0], [255, 255, 255], [64, 128, 192]]], dtype=np.uint8)
    assert colour_types(Image.fromarray(pixels)).tolist() == [[0, N_VISUAL_TYPES - 1, (1 * 4 + 2) * 4 + 3]]
    sweep = probe_sweep(shapes, scenes, sites=["adapter.hook_out"], probe="ridge", progress=False,
                        control="control_task", sensitivity=False)
    classes = np.random.default_rng([sweep.settings.seed + 1, 3]).integers(0, len(sweep.class_names), N_VISUAL_TYPES)
    correct = valid = 0
    predictions = sweep.predictions[("control_task", "adapter.hook_out")]
    row = 0
    for batch in labelled_batches(shapes, scenes, sweep.test_indices, batch_size=64, visual_types=True):
        labels = batch.labels["llm"]
        task = torch.from_numpy(classes)[batch.types["llm"]]
        predicted = predictions[row:row + len(batch.indices)].long()
        correct += int(((predicted == task) & labels.valid).sum())
        valid += int(labels.valid.sum())
        row += len(batch.indices)
    table = sweep.table.set_index("condition")
    assert table.loc["control_task", "token_accuracy"] == pytest.approx(correct / valid)
    # the model's probe reads the real classes better than a probe can learn the random one
    assert table.loc["model", "token_accuracy"] > table.loc["control_task", "token_accuracy"]


def test_the_null_head_selection_quoted_in_the_docs_is_what_the_benchmark_computes():
    null = benchmark("null_recovery")
    heads = null.head_selection(2000, 0)
    page = (ROOT / "docs" / "statistics.md").read_text()
    same, other, error = (heads[k] for k in ("scored on the choosing images", "scored on other images",
                                             "standard error of the latter"))
    assert f"+{same:.3f} on the images that chose them and {other:+.3f}" in page
    assert f"(standard error {error:.3f})" in page


def test_knockout_pairs_are_chosen_on_training_images_not_on_the_scored_ones(shapes, sweep):
    from mmlens.experiments import anchor_knockout, conflicting_pairs
    from mmlens.probing.batches import labelled_batches
    from mmlens.probing.metrics import SegmentationScores
    from mmlens.probing.predict import predict_image_tokens

    probe = sweep.probes[("model", "adapter.hook_out")]
    scores = SegmentationScores(len(sweep.class_names), sweep.ignore_index)
    for batch in labelled_batches(shapes, sweep.dataset, sweep.train_indices, batch_size=64):
        predicted = predict_image_tokens(shapes, batch.inputs, {"adapter.hook_out": probe})["adapter.hook_out"]
        labels = batch.labels["llm"]
        scores.add(predicted, labels.labels, labels.valid, batch.masks, batch.inputs.layout.pixels("llm"))
    by_hand = conflicting_pairs(sweep, "adapter.hook_out", 4, confusion=scores.confusion)
    result = anchor_knockout(shapes, sweep, n_control=1)
    pd.testing.assert_frame_equal(result.pairs, by_hand)
    assert f"(chosen on {len(sweep.train_indices)} training images)" in result.findings()[0]
    with pytest.raises(InputError, match="share rows"):
        anchor_knockout(shapes, sweep, pairs_from=sweep.test_indices[:4], n_control=1)


def test_head_choice_reports_its_stability_and_simultaneous_intervals(shapes, sweep):
    from mmlens.experiments import find_recovery_heads

    result = find_recovery_heads(shapes, sweep, corruption="counterfactual", n_images=None, top_k=2, n_maps=0,
                                 attribution=False)
    table = result.table
    n_heads = len(table)
    # every resample of the selection images picks exactly top_k heads
    assert table.chosen_in.sum() == pytest.approx(2.0)
    assert ((table.chosen_in >= 0) & (table.chosen_in <= 1)).all()
    assert (table.effect_simultaneous_low <= table.effect).all() and (table.effect <= table.effect_simultaneous_high).all()
    # wider than the pointwise intervals on average: one band holds for all heads at once
    simultaneous = (table.effect_simultaneous_high - table.effect_simultaneous_low).mean()
    assert simultaneous > (table.effect_high - table.effect_low).mean() and n_heads == 16


def test_logistic_numbers_do_not_depend_on_batch_size(shapes, scenes):
    kwargs = dict(sites=SITES[:2] + SITES[3:], probe="logistic", l2=1e-2, progress=False, sensitivity=False)
    small, large = (probe_sweep(shapes, scenes, batch_size=size, **kwargs) for size in (8, 32))
    np.testing.assert_allclose(small.table.miou, large.table.miou, atol=1e-4)
    assert small.findings() == large.findings()


def test_a_penalty_chosen_at_the_grid_edge_is_named_in_the_findings(shapes, scenes):
    edge = probe_sweep(shapes, scenes, sites=SITES, probe="ridge", progress=False, alphas=(1.0, 10.0),
                       sensitivity=False)
    assert edge.summary().loc["penalties_at_grid_edge", "value"] == 3  # the smallest candidate, at every summary site
    line = edge.findings()[-1]
    assert line.startswith("The penalty chosen at A-in (1, the smallest candidate); A-out (1, the smallest candidate)")
    assert "widen alphas" in line
