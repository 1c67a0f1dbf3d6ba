"""The logistic probe in bounded memory: fitted chunk by chunk from the disk store, it is the probe
fitted on everything at once (the loss and gradient are the same sums, added in float64)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from mmlens.probing.logistic import chunk_rows, fit_logistic_many
from mmlens.probing.store import ActivationStore


@pytest.fixture(scope="module")
def scenes_small():
    from mmlens.data import load_segmentation

    return load_segmentation("scenes", split="validation", n=24, seed=0)


def _problem(seed: int = 0, n: int = 600, d: int = 12, classes: int = 4):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=generator) * 2
    y = torch.randint(0, classes, (n,), generator=generator)
    x = centres[y] + torch.randn(n, d, generator=generator) * 3 + 5  # offset: standardisation matters
    return x, y


def test_chunk_size_follows_the_memory_budget():
    rows = chunk_rows(4096, 150, memory_mb=64)
    assert 64 * 2**20 / 2 < rows * 4 * (2 * 4096 + 2 * 150) <= 64 * 2**20
    assert chunk_rows(4096, 150, memory_mb=1e-9) == 1


def test_a_probe_fitted_in_chunks_from_the_store_equals_one_fitted_in_memory(tmp_path):
    x, y = _problem()
    x = x.half().float()  # what the float16 store gives back
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    store = ActivationStore(x.shape[1], 2, tmp_path, name="blocks.0.hook_resid_post")
    for start in range(0, len(x), 97):  # appended in uneven pieces, as batches arrive
        store.append(x[start : start + 97], y[start : start + 97], shuffled[start : start + 97])
    features = store.features(1)
    chunks = list(features.chunks(64))
    # chunks never span two appends: 97 rows are cut 64 + 33, the same on any rank that stored them
    assert [len(c[0]) for c in chunks] == [64, 33] * 6 + [18]
    assert torch.equal(torch.cat([c[0] for c in chunks]), x) and torch.equal(torch.cat([c[1] for c in chunks]), shuffled)

    whole = fit_logistic_many([(x, y)], 4, max_iter=50)[0]
    budget = 128 * (4 * (2 * x.shape[1] + 2 * 4) + 8) / 2**20  # 128 tokens per chunk: one append each
    assert chunk_rows(x.shape[1], 4, budget) == 128
    chunked = fit_logistic_many([store.features(0)], 4, max_iter=50, memory_mb=budget)[0]
    for name in ("mean", "scale"):  # float64 sums of the same numbers
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), atol=1e-6, rtol=1e-6)
    # L-BFGS runs until the float32 gradient stops resolving progress; per-chunk matmuls round
    # differently, so the two runs stop a little apart: measured 7e-5 on weights of size ~0.5
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), atol=2e-4, rtol=0)
    assert (chunked.predict(x) == whole.predict(x)).float().mean() >= 0.99
    store.close()


def test_values_beyond_float16_range_are_kept_in_float32_and_the_rest_still_rounded_to_float16(tmp_path):
    store = ActivationStore(4, 1, tmp_path, name="blocks.0.hook_resid_post")
    small = torch.tensor([[1.1, -2.3, 0.5, 3.7], [0.1, 0.2, 0.3, 0.4]])
    huge = torch.tensor([[1.1, 7e4, -2e5, 0.5]], dtype=torch.bfloat16)  # beyond 65504 in bfloat16, as an LLM gives
    store.append(small, torch.zeros(2, dtype=torch.long))
    store.append(huge, torch.ones(1, dtype=torch.long))
    features, labels = store.read()
    # each value is what float16 keeps where it fits and float32 where it does not, whichever append held it
    expected = torch.cat([small.half().float(), torch.where(huge.half().isfinite(), huge.half().float(), huge.float())])
    assert torch.equal(features, expected) and labels.flatten().tolist() == [0, 0, 1]
    chunks = list(store.features(0).chunks(8))
    assert torch.equal(torch.cat([c[0] for c in chunks]), expected)
    store.close()


def _scaled(factor: float, hook_name: str):
    """An intervention that multiplies one site's activations by `factor` in every forward."""
    return lambda inputs: [(hook_name, lambda activation, hook: activation * factor)]


def test_a_logistic_sweep_through_activations_beyond_float16_range_finishes(scenes_small):
    from mmlens import HookedMLLM
    from mmlens.probing import probe_sweep

    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    site = "blocks.0.hook_resid_post"
    settings = dict(sites=[site], probe="logistic", batch_size=8, progress=False, n_boot=1000, l2=1e-3,
                    max_train_tokens_per_image=16, sensitivity=False, max_iter=15)
    plain = probe_sweep(model, scenes_small, **settings)
    # about 1e5 times the site's values: tokens beyond 65504, which aborted the sweep midway before
    scaled = probe_sweep(model, scenes_small, intervention=_scaled(2.0**14, site), **settings)
    row = lambda sweep: sweep.table.set_index("hook").loc[site]  # noqa: E731
    # a standardised probe does not care about the scale; float16 rounding of the two stores differs
    assert abs(row(scaled).miou - row(plain).miou) < 0.02
    assert row(scaled).n_test_tokens == row(plain).n_test_tokens


def test_an_interrupted_logistic_sweep_leaves_no_store(tmp_path, scenes_small):
    from mmlens import HookedMLLM
    from mmlens.probing import probe_sweep

    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    forwards = []

    def stop_at_the_third_batch(inputs):
        forwards.append(1)
        if len(forwards) == 3:  # two batches are in the store by now
            raise KeyboardInterrupt
        return []

    with pytest.raises(KeyboardInterrupt):
        probe_sweep(model, scenes_small, sites=["blocks.0.hook_resid_post"], probe="logistic", batch_size=4,
                    progress=False, n_boot=1000, store_dir=str(tmp_path / "stores"), intervention=stop_at_the_third_batch)
    assert len(forwards) == 3
    assert not (tmp_path / "stores").exists() or not any((tmp_path / "stores").rglob("*"))


SIGTERM_SCRIPT = """
import os, signal, sys
from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.probing import probe_sweep
forwards = []
def terminate_at_the_third_batch(inputs):
    forwards.append(1)
    if len(forwards) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return []
probe_sweep(HookedMLLM.from_pretrained("tiny-shapes-llava"), load_segmentation("scenes", split="validation", n=24, seed=0),
            sites=["blocks.0.hook_resid_post"], probe="logistic", batch_size=4, progress=False, n_boot=1000,
            store_dir=sys.argv[1], intervention=terminate_at_the_third_batch)
"""


def test_a_terminated_logistic_sweep_removes_its_store(tmp_path):
    """SIGTERM (torchrun's and schedulers' first word) ends the process through Python's cleanup."""
    stores = tmp_path / "stores"
    done = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, str(stores)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert not stores.exists() or not any(stores.rglob("*"))
