"""The logistic probe in bounded memory: fitted chunk by chunk from the disk store, it is the probe
fitted on everything at once (the loss and gradient are the same sums, added in float64)."""

from __future__ import annotations

import torch

from mmlens.probing.logistic import chunk_rows, fit_logistic_many
from mmlens.probing.store import ActivationStore


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
