"""Sparse probes as a probe kind of the sweep, on the embedded model: k raw dimensions or SAE
features per class, chosen on training images only, scored like every other probe, saved exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import concatenate_datasets

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import InputError
from mmlens.probing import load_sweep, probe_sweep, save_sweep
from mmlens.probing.sparse import SparseLinearProbe
from mmlens.sae import train_sae

SITE = "adapter.hook_out"
SWEEP = dict(sites=[SITE], probe="sparse", progress=False, n_boot=1000, batch_size=16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds contention
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return HookedMLLM.from_pretrained("tiny-shapes-llava")


@pytest.fixture(scope="module")
def scenes():
    return load_segmentation("scenes", split="validation", n=32, seed=0)


@pytest.fixture(scope="module")
def raw_sweep(model, scenes):
    return probe_sweep(model, scenes, sparse_k=2, **SWEEP)


@pytest.fixture(scope="module")
def sae(model):
    training = load_segmentation("scenes", split="train", n=16, seed=0)
    return train_sae(model, training, SITE, architecture="topk", k=4, d_sae=64, steps=40, batch_size=256,
                     lr=2e-3, seed=0).sae


@pytest.fixture(scope="module")
def sae_sweep(model, scenes, sae):
    return probe_sweep(model, scenes, sae=sae, sparse_ks=(1, 2), cv_folds=2, **SWEEP)


def test_the_sparse_probe_reads_k_dimensions_per_class_and_is_scored_in_the_table(raw_sweep, model) -> None:
    probe = raw_sweep.probe(SITE)
    assert isinstance(probe, SparseLinearProbe) and probe.kind == "sparse" and probe.sae is None
    assert probe.chosen.shape == (len(raw_sweep.class_names), 2)
    assert probe.weight.shape[0] == model.cfg.d_model  # raw dimensions: the site's own width
    read = probe.weight.abs().sum(1) > 0
    assert set(read.nonzero().flatten().tolist()) <= set(probe.features.tolist())
    row = raw_sweep.table.set_index("hook").loc[SITE]
    assert row.penalty == 2 and 0 <= row.miou_low <= row.miou <= row.miou_high
    # well above the majority class (background covers about 70% of the tokens)
    assert row.token_accuracy > 0.8 and row.miou > 0.2


def test_features_are_chosen_on_training_images_only(model, scenes, raw_sweep) -> None:
    """The same training rows with other held-out images: the same features, other scores."""
    others = load_segmentation("scenes", split="validation", n=32, seed=1)
    test_rows = set(raw_sweep.test_indices.tolist())
    mixed = concatenate_datasets([scenes, others]).select(
        [row + len(scenes) if row in test_rows else row for row in range(len(scenes))])
    again = probe_sweep(model, mixed, sparse_k=2, **SWEEP)
    assert np.array_equal(again.test_indices, raw_sweep.test_indices)
    assert torch.equal(again.probe(SITE).chosen, raw_sweep.probe(SITE).chosen)
    torch.testing.assert_close(again.probe(SITE).weight, raw_sweep.probe(SITE).weight)
    assert again.table.miou.iloc[0] != raw_sweep.table.miou.iloc[0]


def test_sae_features_are_the_basis_and_k_is_cross_validated(sae_sweep, sae, model, scenes) -> None:
    probe = sae_sweep.probe(SITE)
    assert probe.sae is sae and probe.weight.shape[0] == sae.cfg.d_sae
    penalties = sae_sweep.penalties
    assert penalties.candidate.tolist() == [1.0, 2.0]
    best = penalties.loc[penalties.cv_loss.idxmin(), "candidate"]
    assert sae_sweep.table.penalty.iloc[0] == best == probe.chosen.shape[1]
    batch = model.prepare([scenes[int(r)]["image"] for r in sae_sweep.test_indices[:2]], [""] * 2)
    _, cache = model.run_with_cache(batch, names_filter=SITE)
    tokens = batch.layout.gather("adapter", cache[SITE])
    predicted = probe.predict(tokens.flatten(0, 1))
    assert torch.equal(predicted.view(2, -1).cpu(), sae_sweep.predictions[("model", SITE)][:2].long())


def test_save_and_load_give_back_the_same_sparse_probes_and_sae(sae_sweep, tmp_path) -> None:
    loaded = load_sweep(save_sweep(sae_sweep, tmp_path / "sweep"))
    probe, back = sae_sweep.probe(SITE), loaded.probe(SITE)
    assert isinstance(back, SparseLinearProbe) and torch.equal(back.chosen, probe.chosen)
    for name, tensor in probe.sae.state_dict().items():
        assert torch.equal(back.sae.state_dict()[name], tensor)
    x = torch.randn(50, probe.sae.cfg.d_in, generator=torch.Generator().manual_seed(0))
    assert torch.equal(back.logits(x), probe.logits(x))
    assert loaded.settings.sparse_ks == (1, 2) and loaded.table.equals(sae_sweep.table)


def test_bad_sparse_settings_are_refused_before_any_forward(model, scenes, sae) -> None:
    with pytest.raises(InputError, match="does not probe"):
        probe_sweep(model, scenes, sae=sae, **{**SWEEP, "sites": ["blocks.0.hook_resid_post"]})
    with pytest.raises(InputError, match="sparse probes only"):
        probe_sweep(model, scenes, sae=sae, **{**SWEEP, "probe": "ridge"})
    with pytest.raises(InputError, match="whole numbers"):
        probe_sweep(model, scenes, sparse_k=1.5, **SWEEP)


def _store_with_a_low_marker(tmp_path):
    """Three classes over 6 dimensions: class 0 is marked by a LOW value of dimension 2 (it is -3
    there, 0 elsewhere), classes 1 and 2 by high values of dimensions 0 and 1."""
    from mmlens.probing.store import ActivationStore

    generator = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = 0.1 * torch.randn(300, 6, generator=generator)
    x[y == 0, 2] -= 3.0
    x[y == 1, 0] += 2.0
    x[y == 2, 1] += 2.0
    store = ActivationStore(6, 1, directory=tmp_path, name="synthetic")
    store.append(x, y)
    return store


def test_a_raw_dimension_that_marks_a_class_by_low_values_is_chosen(tmp_path) -> None:
    from types import SimpleNamespace

    from mmlens.probing.linear import LinearProbe
    from mmlens.probing.sparse import mean_difference_ranking, sparse_problem

    store = _store_with_a_low_marker(tmp_path)
    cfg = SimpleNamespace(sae=None, logistic_memory_mb=64.0, l2=1e-3, sparse_k=1, candidates=(1,))

    def fit(sources, l2, inits):  # only the chosen columns matter here
        d = sources[0].d
        return [LinearProbe(torch.zeros(d), torch.ones(d), torch.zeros(d, 3), torch.zeros(3))]

    _, solve = sparse_problem(store, 0, "synthetic", cfg, n_classes=3, n_folds=1, fit=fit)
    assert solve(1).chosen[:, 0].tolist() == [2, 0, 1]
    # SAE features (non-negative) keep the signed ranking: a feature is chosen for firing on the class
    sums = torch.tensor([[0.0, 5.0], [4.0, 0.0]])
    assert mean_difference_ranking(sums, torch.tensor([1, 1]), 1, absolute=False)[:, 0].tolist() == [1, 0]


def test_a_sparse_probe_saved_alone_keeps_its_chosen_dimensions_and_sae(sae_sweep, raw_sweep, tmp_path) -> None:
    from mmlens.probing.linear import LinearProbe

    for name, sweep in (("sae", sae_sweep), ("raw", raw_sweep)):
        probe = sweep.probe(SITE)
        path = probe.save(tmp_path / f"{name}.safetensors")
        back = SparseLinearProbe.load(path)
        assert torch.equal(back.chosen, probe.chosen) and (back.sae is None) == (probe.sae is None)
        d = probe.sae.cfg.d_in if probe.sae is not None else probe.weight.shape[0]
        x = torch.randn(20, d, generator=torch.Generator().manual_seed(1))
        assert torch.equal(back.logits(x), probe.logits(x))
        with pytest.raises(InputError, match="SparseLinearProbe.load"):
            LinearProbe.load(path)
