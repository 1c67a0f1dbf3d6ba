"""A disk-backed, append-only store of token activations in float16, one per probe site.

Logistic probes need their training features more than once (one L-BFGS step per iteration), so
the sweep writes them to disk as they stream past instead of running the model again for every
iteration: one forward pass per image in total, and memory that does not grow with the dataset
(the fit reads the store back in chunks). float16 halves the disk and is ample precision for a
standardised linear probe; disk grows with the tokens kept (see `max_train_tokens_per_image`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import InputError


class ActivationStore:
    def __init__(self, d: int, n_label_sets: int, directory: str | Path | None = None, name: str = "site"):
        self._tmp = None if directory is not None else tempfile.TemporaryDirectory(prefix="mmlens-store-")
        root = Path(directory if directory is not None else self._tmp.name)
        root.mkdir(parents=True, exist_ok=True)
        safe = name.replace("/", "_")
        self.features_path = root / f"{safe}.f16"
        self.labels_path = root / f"{safe}.labels.i32"
        self.d, self.n_label_sets, self.n, self.name = d, n_label_sets, 0, name
        self.sizes: list[int] = []  # rows of each append (one batch of images)
        self._features = open(self.features_path, "wb")
        self._labels = open(self.labels_path, "wb")

    def append(self, x: Float[Tensor, "n d"], *labels: Int[Tensor, "n"], fold: Int[Tensor, "n"] | None = None) -> None:
        """Add tokens with one label per label set; `fold`: each token's cross-validation fold
        (its image's), kept beside the labels so a fit can leave a fold out."""
        if len(labels) != self.n_label_sets:
            raise ValueError(f"expected {self.n_label_sets} label sets, got {len(labels)}")
        half = x.detach().to("cpu", torch.float16)
        if not torch.isfinite(half).all():  # finite in the model's dtype (checked upstream), so beyond float16's range
            raise InputError(
                f"{self.name}: activations up to {float(x.abs().max()):.4g} exceed float16's range (65504) and cannot be "
                "stored for the logistic probe; use the ridge probe at this site, or leave it out of the sweep"
            )
        self._features.write(half.numpy().tobytes())
        fold = torch.zeros(x.shape[0], dtype=torch.int32) if fold is None else fold
        stacked = torch.stack([y.cpu().to(torch.int32) for y in (*labels, fold)], dim=1)
        self._labels.write(stacked.numpy().tobytes())
        self.n += x.shape[0]
        self.sizes.append(x.shape[0])

    def read(self) -> tuple[Float[Tensor, "n d"], Int[Tensor, "n label_sets"]]:
        """Everything appended so far (features as float32)."""
        self._features.flush()
        self._labels.flush()
        if self.n == 0:
            return torch.zeros(0, self.d), torch.zeros(0, self.n_label_sets, dtype=torch.long)
        features = np.memmap(self.features_path, dtype=np.float16, mode="r", shape=(self.n, self.d))
        labels = np.fromfile(self.labels_path, dtype=np.int32).reshape(self.n, self.n_label_sets + 1)
        return torch.from_numpy(np.asarray(features, dtype=np.float32)), torch.from_numpy(labels[:, :-1]).long()

    def features(self, label_set: int = 0, folds: Collection[int] | None = None) -> "StoredFeatures":
        """The stored tokens with one label set, read in chunks (for `fit_logistic_many`);
        `folds`: only tokens of these cross-validation folds."""
        self._features.flush()
        self._labels.flush()
        return StoredFeatures(self, label_set, folds)

    def close(self) -> None:
        self._features.close()
        self._labels.close()
        for path in (self.features_path, self.labels_path):
            path.unlink(missing_ok=True)
        if self._tmp is not None:
            self._tmp.cleanup()


class StoredFeatures:
    """One label set of a store, read from disk a chunk at a time: memory is the chunk, not the
    store (a memory map would keep every page it touched resident). A chunk never spans two
    appends (batches), and an append is cut the same way whatever came before it: each batch's
    partial sums are then the same numbers on whichever rank stored it."""

    def __init__(self, store: ActivationStore, label_set: int, folds: Collection[int] | None = None):
        self.store, self.label_set, self.d = store, label_set, store.d
        self.folds = None if folds is None else np.asarray(sorted(set(folds)), dtype=np.int32)
        self.n = store.n if folds is None else sum(len(y) for _, y in self.chunks(1 << 30, features=False))

    def chunks(self, rows: int, features: bool = True):
        store = self.store
        pieces = [min(rows, size - start) for size in store.sizes for start in range(0, size, rows)]
        columns = store.n_label_sets + 1
        with open(store.features_path, "rb") as stored, open(store.labels_path, "rb") as labels:
            for m in pieces:
                if features:
                    x = np.fromfile(stored, dtype=np.float16, count=m * self.d).reshape(m, self.d)
                y = np.fromfile(labels, dtype=np.int32, count=m * columns).reshape(m, columns)
                keep = slice(None) if self.folds is None else np.isin(y[:, -1], self.folds)
                if not features:
                    yield None, y[keep, self.label_set]
                elif self.folds is None or keep.any():
                    yield torch.from_numpy(x[keep].astype(np.float32)), torch.from_numpy(y[keep, self.label_set].astype(np.int64))
