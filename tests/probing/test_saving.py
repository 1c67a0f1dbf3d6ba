"""Public save/load for probes and whole sweeps: what comes back computes exactly what was saved."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mmlens.data import load_segmentation
from mmlens.errors import InputError
from mmlens.probing import LinearProbe, load_probe, load_sweep, probe_sweep, save_probe, save_sweep
from mmlens.viz import plot_probe_predictions

SITES = ["adapter.hook_in", "adapter.hook_out", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def scenes():
    return load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)


@pytest.fixture(scope="module")
def sweep(tiny_clip, scenes):
    with torch.no_grad():
        return probe_sweep(tiny_clip.model, scenes, sites=SITES, probe="logistic", control="shuffled_labels",
                           batch_size=8, n_boot=1000, progress=False, max_iter=20)


def test_probe_round_trip(sweep, tmp_path):
    probe = sweep.probe("adapter.hook_out")
    path = probe.save(tmp_path / "probes" / "adapter_out.safetensors")
    back = LinearProbe.load(path)
    assert back.kind == "logistic" == probe.kind
    for name in ("mean", "scale", "weight", "bias"):
        assert torch.equal(getattr(back, name), getattr(probe, name))
    x = torch.randn(50, probe.mean.shape[0])
    assert torch.equal(back.logits(x), probe.logits(x))
    again = load_probe(save_probe(probe, tmp_path / "again.safetensors"))     # the function spelling
    assert torch.equal(again.weight, probe.weight)


def test_sweep_round_trip(sweep, scenes, tmp_path):
    save_sweep(sweep, tmp_path / "sweep")
    back = load_sweep(tmp_path / "sweep", scenes)
    pd.testing.assert_frame_equal(back.table, sweep.table, check_exact=True)
    pd.testing.assert_frame_equal(back.summary(), sweep.summary(), check_exact=True)
    assert back.findings() == sweep.findings()
    assert back.probes.keys() == sweep.probes.keys()
    for key, probe in sweep.probes.items():
        assert torch.equal(back.probes[key].weight, probe.weight) and torch.equal(back.predictions[key], sweep.predictions[key])
    np.testing.assert_array_equal(back.test_masks, sweep.test_masks)
    assert back.sites == sweep.sites and back.settings == sweep.settings and back.grids == sweep.grids
    # with its dataset back, a loaded sweep draws what the fitted one drew
    assert plot_probe_predictions(back, example=1).to_json() == plot_probe_predictions(sweep, example=1).to_json()


def test_loading_says_what_is_wrong(sweep, scenes, tmp_path):
    with pytest.raises(InputError, match="no saved sweep"):
        load_sweep(tmp_path / "nothing", scenes)
    save_sweep(sweep, tmp_path / "sweep")
    with pytest.raises(InputError, match="24 images, this one has 8"):
        load_sweep(tmp_path / "sweep", scenes.select(range(8)))
    with pytest.raises(InputError, match="not a probe saved by mmlens"):
        load_probe(tmp_path / "sweep" / "split.safetensors")
    with pytest.raises(InputError, match="no probe file"):
        load_probe(tmp_path / "missing.safetensors")
