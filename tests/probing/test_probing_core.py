"""Probe fitting and metrics, checked against closed forms and hand counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmlens.model.images.layout import TokenGrid
from mmlens.probing import ActivationStore, RidgeStatistics, SegmentationScores, fit_logistic, miou_from_counts
from mmlens.probing.logistic import fit_logistic_many


def _data(n=400, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, d, generator=g) * 3
    x = centres[y] + torch.randn(n, d, generator=g) + torch.tensor([100.0] + [0.0] * (d - 1))  # an offset dim
    return x, y


def test_ridge_from_streamed_statistics_equals_direct_solution():
    x, y = _data()
    stats = RidgeStatistics(x.shape[1], 3)
    for chunk in torch.arange(len(x)).split(37):  # streamed in uneven batches
        stats.update(x[chunk], y[chunk])
    probe = stats.solve(alpha=0.1)
    xd = x.double()
    z = (xd - xd.mean(0)) / xd.std(0, unbiased=False)
    onehot = torch.nn.functional.one_hot(y, 3).double()
    w = torch.linalg.solve(z.T @ z / len(x) + 0.1 * torch.eye(x.shape[1], dtype=torch.float64), z.T @ (onehot - onehot.mean(0)) / len(x))
    torch.testing.assert_close(probe.weight.double(), w, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probe.logits(x).double(), z @ w + onehot.mean(0), atol=1e-4, rtol=1e-4)
    assert (probe.predict(x) == y).float().mean() > 0.9


def test_ridge_statistics_merge_like_one_worker():
    x, y = _data()
    whole, a, b = RidgeStatistics(6, 3), RidgeStatistics(6, 3), RidgeStatistics(6, 3)
    whole.update(x, y)
    a.update(x[:150], y[:150])
    b.update(x[150:], y[150:])
    torch.testing.assert_close(a.merge(b).solve().weight, whole.solve().weight)


def test_logistic_probe_separates_and_is_deterministic():
    x, y = _data()
    p1, p2 = fit_logistic(x, y, 3), fit_logistic(x, y, 3)
    torch.testing.assert_close(p1.weight, p2.weight)
    assert (p1.predict(x) == y).float().mean() > 0.95


def test_store_round_trip_in_float16(tmp_path):
    x, y = _data(n=50)
    store = ActivationStore(6, 2, tmp_path, name="blocks.0.hook_resid_post")
    store.append(x[:20], y[:20], y[:20].flip(0))
    store.append(x[20:], y[20:], y[20:].flip(0))
    features, labels = store.read()
    torch.testing.assert_close(features, x.half().float())
    assert labels[:, 0].tolist() == y.tolist()
    store.close()
    assert not any(tmp_path.iterdir())


def test_pixel_metrics_by_hand():
    grid = TokenGrid(1, 2, image_size=(2, 4))  # two tokens: left and right 2x2 boxes
    scores = SegmentationScores(n_classes=3, ignore_index=255)
    mask = torch.tensor([[[0, 0, 1, 1], [0, 255, 1, 2]]])
    labels = torch.tensor([[0, 1]])
    scores.add(torch.tensor([[0, 2]]), labels, torch.ones(1, 2, dtype=torch.bool), mask, grid)
    # left box predicted 0: 3 valid pixels of class 0 correct; right box predicted 2: 3 class-1 pixels wrong, 1 class-2 right
    assert scores.token_accuracy == 0.5
    assert scores.pixel_accuracy == pytest.approx(4 / 7)
    iou = scores.class_iou()
    assert iou[0] == 1.0 and iou[1] == 0.0 and iou[2] == pytest.approx(1 / 4)
    assert scores.miou == pytest.approx((1 + 0 + 0.25) / 3)
    assert miou_from_counts(np.array([[1, 0], [0, 0], [0, 0]])) == 1.0  # absent classes are skipped


def test_a_probe_does_not_depend_on_the_probes_fitted_beside_it():
    """Each probe is its own L-BFGS run, so stopping at max_iter cannot couple probes."""
    (x1, y1), (x2, y2) = _data(n=300, d=6, seed=1), _data(n=200, d=4, seed=2)
    together = fit_logistic_many([(x1, y1), (x2, y2)], 3, max_iter=20)
    alone = [fit_logistic(x1, y1, 3, max_iter=20), fit_logistic(x2, y2, 3, max_iter=20)]
    for a, b in zip(together, alone):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


@pytest.mark.parametrize("kind", ["ridge", "logistic"])
def test_a_probe_read_back_from_disk_gives_bit_identical_logits(tmp_path, kind):
    # MKL rounds float32 matmuls by operand layout on some CPUs, so a resumed run (probes from disk)
    # equals an uninterrupted one (probes in memory) only if both are laid out alike.
    from safetensors.torch import load_file, save_file

    from mmlens.probing.linear import LinearProbe

    x, y = _data(n=3000, d=96, classes=7)
    if kind == "ridge":
        stats = RidgeStatistics(96, 7)
        stats.update(x, y)
        fitted = stats.solve()
    else:
        fitted = fit_logistic(x, y, 7, max_iter=5)
    parts = ("mean", "scale", "weight", "bias")
    save_file({p: getattr(fitted, p).contiguous() for p in parts}, str(tmp_path / "probe.safetensors"))
    stored = load_file(str(tmp_path / "probe.safetensors"))
    restored = LinearProbe(*(stored[p] for p in parts), kind=kind)
    for p in parts:
        assert getattr(fitted, p).stride() == getattr(restored, p).stride(), p
    assert torch.equal(fitted.logits(x), restored.logits(x))
