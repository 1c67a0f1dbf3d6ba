"""The study's SAE feature page and logit-lens figures on the embedded model: a tiny study config
runs the two stages, the report holds one rendered figure per feature and per lens image, and the
values drawn are the analyses' own."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from mmlens.data import load_segmentation
from mmlens.model import HookedMLLM
from mmlens.runs import STAGES, RunFolder, config_from_dict, run_study
from mmlens.runs.report import build_report
from mmlens.sae import SAEConfig, TunedLens, canvas_picture, feature_maps, logit_lens_maps, sae_from_weights
from mmlens.testing.browser import dump_dom, find_chromium, rendered_figures

N_FEATURES, N_LENS_IMAGES = 3, 2
CONFIG = {"model": "tiny-shapes-llava", "dataset": {"name": "scenes", "n": 24}, "n_boot": 1000,
          "sae": {"enabled": True, "d_sae": 64, "steps": 60, "n_features": N_FEATURES, "n_images": 2, "n_crops": 3},
          "lens": {"enabled": True, "n_images": N_LENS_IMAGES, "tuned": True}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds contention
    try:
        out = tmp_path_factory.mktemp("P5_run") / "run"
        stages = {name: STAGES[name] for name in ("sae_features", "logit_lens")}
        run_study(config_from_dict(CONFIG), out, stages=stages, progress=False, report=False, echo=lambda text: None)
        folder = RunFolder.open(out)
        report, why = build_report(folder)
        assert report is not None, why
        return folder, report
    finally:
        torch.set_num_threads(threads)


def test_the_feature_page_shows_the_best_aligned_features_with_their_intervals(run) -> None:
    folder, report = run
    unit = "sae_features/seed-0"
    page = folder.table(unit, "feature_page")
    alignment = folder.table(unit, "alignment")
    assert len(page) == N_FEATURES and page.feature.is_unique
    # chosen and ordered on training images; the held-out IoU only scores them
    assert page.train_iou.is_monotonic_decreasing
    assert (page.iou_low <= page.iou).all() and (page.iou <= page.iou_high).all()
    best = alignment.sort_values("train_iou", ascending=False).drop_duplicates("feature").head(N_FEATURES)
    assert page.feature.tolist() == best.feature.tolist()
    html = report.read_text()
    for row in page.to_dict("records"):
        figure = folder.figure(unit, f"feature_{row['feature']}")
        assert f"SAE feature {row['feature']}: best class {row['class']}" in html
        assert f"training IoU {row['train_iou']:.3f}" in figure.layout.title.text
        assert f"held-out IoU {row['iou']:.3f} [{row['iou_low']:.3f}, {row['iou_high']:.3f}]" in figure.layout.title.text
        heatmaps = [trace for trace in figure.data if trace.type == "heatmap"]
        pictures = [trace for trace in figure.data if trace.type == "image"]  # each drawn image, then the crops
        drawn = [image for image in row["images"].split(", ") if image]
        assert len(heatmaps) == len(drawn) <= 2 and len(pictures) - len(heatmaps) <= 3
        if not drawn:  # chosen on training images, it need not fire on held-out ones; then it scores 0 there
            assert row["iou"] == 0 and len(pictures) == 0
            continue
        assert 1 <= len(pictures) - len(heatmaps)
        assert np.nanmax(np.asarray(heatmaps[0].z, dtype=float)) > 0       # the feature fires on its top image


def test_feature_maps_are_the_features_activations(run) -> None:
    """A drawn map, read back from the report's figure, is the feature painted by `feature_maps`."""
    folder, _ = run
    unit = "sae_features/seed-0"
    stored = folder.load(unit)  # the SAE the stage studied, as it saved it
    sae = sae_from_weights(SAEConfig.from_sae_lens_dict(stored.data["sae"]["cfg"]), stored.tensors["sae"])
    page = folder.table(unit, "feature_page")
    feature, row = int(page.feature[0]), int(page.images[0].split(",")[0])
    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0)
    maps = feature_maps(model, sae, model.prepare([scenes[row]["image"]], [""]), [feature])
    expected = maps.painted(feature)[0].numpy()
    drawn = np.asarray(next(t for t in folder.figure(unit, f"feature_{feature}").data if t.type == "heatmap").z,
                       dtype=float)[::-1]
    np.testing.assert_allclose(drawn, expected[: drawn.shape[0], : drawn.shape[1]], rtol=1e-5, atol=1e-6)


def test_the_lens_figure_holds_the_logit_lens_values(run) -> None:
    folder, report = run
    unit = "logit_lens/seed-0"
    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0)
    images = [scenes[row]["image"] for row in range(N_LENS_IMAGES)]
    lens = logit_lens_maps(model, model.prepare(images, [""] * N_LENS_IMAGES))
    for n in range(N_LENS_IMAGES):
        figure = folder.figure(unit, f"logit_lens_{n}")
        heatmaps = [trace for trace in figure.data if trace.type == "heatmap"]
        assert len(heatmaps) == len(lens.labels) == model.cfg.n_layers + 1
        painted = lens.painted(lens.top_probability)[:, n].numpy()
        for layer, trace in enumerate(heatmaps):
            drawn = np.asarray(trace.z, dtype=float)[::-1]
            np.testing.assert_allclose(drawn, painted[layer, : drawn.shape[0], : drawn.shape[1]], rtol=1e-5)
        assert figure.data[0].type == "image"
        assert np.array_equal(np.asarray(figure.data[0].z), canvas_picture(model, images[n]))
    table = folder.table(unit, "lens")
    assert table.mean_top_probability.between(0, 1).all()
    assert "Logit lens over dataset image 0" in report.read_text()


def test_the_tuned_lens_figure_holds_the_stored_lenss_maps(run) -> None:
    """Drawn beside the logit lens: the maps of the tuned lens the stage trained and stored, trained on
    training images other than the drawn ones."""
    folder, report = run
    stored = folder.load("logit_lens/seed-0")
    lens = TunedLens.from_weights(stored.data["tuned_lens"], stored.tensors["tuned_lens"])
    assert not set(stored.data["tuned_lens"]["train_rows"]) & set(range(N_LENS_IMAGES))
    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0)
    images = [scenes[row]["image"] for row in range(N_LENS_IMAGES)]
    maps = logit_lens_maps(model, model.prepare(images, [""] * N_LENS_IMAGES), lens=lens)
    logit = logit_lens_maps(model, model.prepare(images, [""] * N_LENS_IMAGES))
    assert not torch.allclose(maps.top_probability[0], logit.top_probability[0], atol=1e-2)  # a trained lens
    for n in range(N_LENS_IMAGES):
        heatmaps = [t for t in folder.figure("logit_lens/seed-0", f"tuned_lens_{n}").data if t.type == "heatmap"]
        painted = maps.painted(maps.top_probability)[:, n].numpy()
        for layer, trace in enumerate(heatmaps):
            drawn = np.asarray(trace.z, dtype=float)[::-1]
            np.testing.assert_allclose(drawn, painted[layer, : drawn.shape[0], : drawn.shape[1]], rtol=1e-5)
    assert set(folder.table("logit_lens/seed-0", "lens").lens) == {"logit lens", "tuned lens"}
    assert "Tuned lens over dataset image 0" in report.read_text()


def test_every_feature_and_lens_figure_renders_offline(run) -> None:
    if find_chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but Chromium is missing")
        pytest.skip("Chromium is not installed")
    _, report = run
    figures = rendered_figures(dump_dom(report))
    assert len(figures) == N_FEATURES + 2 * N_LENS_IMAGES  # the logit and the tuned lens per image
    assert all(n >= 1 for n in figures.values()), figures


def test_the_page_chooses_its_features_on_training_images_only() -> None:
    """Changing the held-out images (their IoUs and intervals) must not change which features are shown."""
    import pandas as pd

    from mmlens.sae.feature_page import top_aligned_features

    alignment = pd.DataFrame({"class": ["a", "b", "c", "d"], "feature": [7, 3, 7, 5],
                              "train_iou": [0.9, 0.6, 0.4, 0.2], "iou": [0.5, 0.4, 0.3, 0.2]})
    held_out = {"iou": [0.1, 0.2, 0.8, 0.9]}  # other held-out images: the IoUs reverse
    first = top_aligned_features(alignment, 2)
    again = top_aligned_features(alignment.assign(**held_out), 2)
    assert first.feature.tolist() == again.feature.tolist() == [7, 3]
    assert first["class"].tolist() == again["class"].tolist() == ["a", "b"]


def test_a_study_loads_the_sae_at_sae_path_even_one_naming_no_hook(tmp_path) -> None:
    """A Gemma Scope params.npz names no hook: the study reads it at sae.hook, records its files' sha256,
    and passes no training keywords with it."""
    from mmlens.runs.config import sae_files_sha256

    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    d_in, d_sae = model.cfg.llm.d_model, 32
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "params.npz", W_enc=rng.normal(size=(d_in, d_sae)).astype(np.float32),
             W_dec=rng.normal(size=(d_sae, d_in)).astype(np.float32), b_enc=np.zeros(d_sae, np.float32),
             b_dec=np.zeros(d_in, np.float32), threshold=np.zeros(d_sae, np.float32))
    config = {**CONFIG, "sae": {"enabled": True, "path": str(tmp_path / "params.npz"), "n_features": 2,
                                "n_images": 1, "n_crops": 1}, "lens": {"enabled": False}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_study(config_from_dict(config), tmp_path / "run", stages={"sae_features": STAGES["sae_features"]},
                  progress=False, report=False, echo=lambda text: None)
    finally:
        torch.set_num_threads(threads)
    data = RunFolder.open(tmp_path / "run").load("sae_features/seed-0").data["sae"]
    assert data["sha256"] == sae_files_sha256(tmp_path / "params.npz")
    assert data["cfg"]["metadata"]["hook_name"] == "adapter.hook_out" and data["cfg"]["d_sae"] == d_sae
