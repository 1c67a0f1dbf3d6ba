"""The probe sweep end to end on a tiny model: sites, controls, determinism, summary, plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mmlens.data import load_segmentation
from mmlens.probing import probe_sweep
from mmlens.viz import class_colours, plot_probe_curve, plot_probe_predictions


@pytest.fixture(scope="module")
def scenes():
    return load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)


@pytest.fixture(scope="module")
def ridge_sweep(tiny_clip, scenes):
    return probe_sweep(tiny_clip.model, scenes, probe="ridge", control=["shuffled_labels", "random_init"],
                       batch_size=8, progress=False, n_boot=1000)


def test_every_site_and_condition_is_scored(ridge_sweep, tiny_clip):
    cfg = tiny_clip.model.cfg
    n_sites = 1 + cfg.vision.n_layers + 3 + cfg.n_layers
    table = ridge_sweep.table
    assert set(table.condition) == {"model", "shuffled_labels", "random_init", "penalty/10", "penalty*10"}
    sizes = table.groupby("condition").size()
    assert (sizes[["model", "shuffled_labels", "random_init"]] == n_sites).all()
    assert (sizes[["penalty/10", "penalty*10"]] == 3).all()  # refits at the summary's three sites
    assert list(table[table.condition == "model"].stage.unique()) == ["vision", "adapter", "llm"]
    assert (table.miou_low <= table.miou + 1e-9).all() and (table.miou <= table.miou_high + 1e-9).all()
    assert table.n_test_tokens.gt(0).all()
    n_test = len(ridge_sweep.test_indices)
    for (condition, hook), pred in ridge_sweep.predictions.items():
        assert pred.shape == (n_test, 16)
    assert ridge_sweep.test_masks.shape == (n_test, 32, 32)
    assert not set(ridge_sweep.test_indices) & set(ridge_sweep.train_indices)


def test_shuffled_labels_carry_no_signal(ridge_sweep):
    table = ridge_sweep.table.set_index(["condition", "hook"])
    real = table.loc["model"].token_accuracy
    shuffled = table.loc["shuffled_labels"].token_accuracy
    # a majority-class predictor is the best a probe on shuffled labels can learn
    assert (shuffled <= real + 0.05).all()


def test_sweep_is_deterministic_per_seed(tiny_clip, scenes, ridge_sweep):
    again = probe_sweep(tiny_clip.model, scenes, probe="ridge", control=["shuffled_labels", "random_init"],
                        batch_size=8, progress=False, n_boot=1000)
    pd.testing.assert_frame_equal(again.table, ridge_sweep.table)
    other = probe_sweep(tiny_clip.model, scenes, sites=["adapter.hook_in"], probe="ridge", seed=1,
                        batch_size=8, progress=False, n_boot=1000)
    assert not np.array_equal(other.test_indices, ridge_sweep.test_indices)


def test_summary_reports_drop_and_recovery(ridge_sweep):
    summary = ridge_sweep.summary()
    table = ridge_sweep.table[ridge_sweep.table.condition == "model"].set_index("hook")
    drop = table.loc["adapter.hook_in", "miou"] - table.loc["adapter.hook_out", "miou"]
    assert summary.loc["drop_at_adapter", "value"] == pytest.approx(drop)
    llm = table[table.stage == "llm"]
    # the recovery reads the last LLM layer, fixed before the test images are seen (not their best layer)
    assert summary.loc["recovery_layer", "value"] == llm.layer.max()
    assert summary.loc["recovery_layer_miou", "value"] == pytest.approx(llm.loc[llm.layer.idxmax(), "miou"])
    assert summary.loc["recovery_in_llm", "value"] == pytest.approx(
        llm.loc[llm.layer.idxmax(), "miou"] - table.loc["adapter.hook_out", "miou"])
    for stat in ("drop_at_adapter", "recovery_in_llm"):
        low, high = summary.loc[stat, ["low", "high"]]
        assert low <= summary.loc[stat, "value"] <= high


def test_logistic_sweep_on_chosen_sites(tiny_clip, scenes):
    sweep = probe_sweep(tiny_clip.model, scenes, sites=["vision.blocks.1.hook_resid_post", "blocks.1.hook_resid_post"],
                        probe="logistic", batch_size=8, progress=False, n_boot=1000, max_train_tokens_per_image=8)
    assert list(sweep.table[sweep.table.condition == "model"].site) == ["V1", "L1"]
    assert sweep.probe("blocks.1.hook_resid_post").kind == "logistic"
    assert set(sweep.penalties.candidate) == {1e-4, 1e-3, 1e-2}  # chosen by cross-validation on the training images


def test_plots_render(ridge_sweep):
    curve = plot_probe_curve(ridge_sweep)
    names = {trace.name for trace in curve.data}
    assert {"model", "shuffled_labels", "random_init"} <= names
    predictions = plot_probe_predictions(ridge_sweep, example=0)
    panels = [t for t in predictions.data if t.type in ("image", "heatmap")]
    assert len(panels) == 2 + 3  # image, truth, adapter in/out, last LLM layer
    # the legend names each class painted in any panel, in the colour the panels use for it
    painted = sorted({int(v) for t in panels[1:] for z in [np.asarray(t.z, dtype=float)] for v in np.unique(z[~np.isnan(z)])})
    legend = [t for t in predictions.data if t.type == "scatter"]
    assert [t.name for t in legend] == [ridge_sweep.class_names[c] for c in painted]
    assert [t.marker.color for t in legend] == [class_colours(ridge_sweep.class_names)[c] for c in painted]
    assert "dataset row" in predictions.layout.title.text
    assert curve.layout.yaxis.title.text == "mIoU"
    with pytest.raises(ValueError, match="were not probed"):
        plot_probe_predictions(ridge_sweep, hooks=["blocks.9.hook_resid_post"])


def test_an_intervention_runs_in_every_forward_of_the_sweep(tiny_clip, scenes):
    from mmlens.interventions import TokenGroup, knockout

    model = tiny_clip.model
    made = []

    def blocked(inputs):
        ko = knockout(model, inputs, queries=TokenGroup.image(), keys=TokenGroup.image(), layers=range(model.cfg.n_layers),
                      verify=True)
        made.append(ko)
        return ko

    kwargs = dict(sites=["blocks.1.hook_resid_post"], probe="ridge", batch_size=8, progress=False, n_boot=1000)
    edited = probe_sweep(model, scenes, intervention=blocked, **kwargs)
    plain = probe_sweep(model, scenes, **kwargs)
    assert len(made) == 4  # 18 training scenes in batches of 8 (3 forwards) and 6 test scenes (1)
    assert all(ko.blocked_mass and max(ko.blocked_mass.values()) == 0.0 for ko in made)
    key = ("model", "blocks.1.hook_resid_post")
    assert not torch.allclose(edited.probes[key].mean, plain.probes[key].mean), "the probe saw the edited activations"


def test_an_intervention_and_the_random_init_control_are_refused_together(tiny_clip, scenes):
    with pytest.raises(ValueError, match="random_init and random_llm controls cannot take the intervention"):
        probe_sweep(tiny_clip.model, scenes, control="random_init", intervention=lambda inputs: [], progress=False)


# ------------------------------------------------------------------ inputs that would give plausible wrong numbers
@pytest.mark.parametrize("kind", ["ridge", "logistic"])
def test_non_finite_activations_are_an_error_not_a_score(tiny_clip, scenes, kind):
    from mmlens.errors import InputError

    def overflow(inputs):
        return [("blocks.1.hook_resid_post", lambda x, hook: x.masked_fill(torch.rand_like(x) < 0.01, float("inf")))]

    with pytest.raises(InputError, match="image tokens have NaN or inf activations at blocks.1.hook_resid_post"):
        probe_sweep(tiny_clip.model, scenes, sites=["blocks.1.hook_resid_post"], probe=kind, intervention=overflow,
                    n_boot=1000, max_iter=3, progress=False)


def test_masks_of_another_size_than_their_images_are_refused(tiny_clip, scenes):
    from PIL import Image

    from mmlens.errors import LayoutMismatchError

    def shrink(row):
        mask = row["mask"]
        return {"mask": mask.resize((mask.width // 2, mask.height), Image.NEAREST) if row["index"] == 3 else mask}

    damaged = scenes.add_column("index", list(range(len(scenes)))).map(shrink)
    with pytest.raises(LayoutMismatchError, match=r"dataset row 3: the mask is \(height, width\) = \(\d+, \d+\) but its image"):
        probe_sweep(tiny_clip.model, damaged, sites=["adapter.hook_out"], probe="ridge", n_boot=1000, progress=False)


def test_too_few_images_or_no_sites_are_refused(tiny_clip, scenes):
    from mmlens.errors import InputError

    with pytest.raises(InputError, match=r"2 images split 1 train / 1 test .* Use at least \d+ images"):
        probe_sweep(tiny_clip.model, scenes.select(range(2)), sites=["adapter.hook_out"], probe="ridge", progress=False)
    with pytest.raises(InputError, match="sites is empty"):
        probe_sweep(tiny_clip.model, scenes, sites=[], probe="ridge", progress=False)
