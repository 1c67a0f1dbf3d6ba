"""A disk-backed, append-only store of token activations, one per probe site, in folders that
are removed on every way out.

Logistic probes need their training features more than once (one L-BFGS step per iteration), so
the sweep writes them to disk as they stream past instead of running the model again for every
iteration: one forward pass per image in total, and memory that does not grow with the dataset
(the fit reads the store back in chunks). Features are kept in float16, which halves the disk and
is ample precision for a standardised linear probe; an append holding a value beyond float16's
range (65504, reached by the massive activations of some LLM layers) is kept in float32 instead,
its other values still rounded to float16, so what is read back depends on the value alone, never
on which batch or rank stored it. Disk grows with the tokens kept (see `max_train_tokens_per_image`).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import InputError

# testing hook: "R:K" makes rank R (torchrun's RANK, 0 in one process) SIGKILL itself after its
# K-th append to any store: a deterministic stand-in for a rank killed while its stores exist
KILL_ENV = "MMLENS_KILL_STORE_AT"
_appends_in_process = 0


@contextmanager
def store_folder(store_dir: str | Path | None, rank: int = 0) -> Iterator[Path]:
    """A folder for one rank's stores, removed however the block ends: normally, by an exception,
    by KeyboardInterrupt or by SIGTERM (turned into SystemExit while the block runs, so cleanup
    code runs; SIGKILL leaves it, for a resumed run to remove). `store_dir` None: a fresh temporary
    folder; otherwise `store_dir/rank-R`, emptied first (what a killed earlier run of the same rank left)."""
    if store_dir is None:
        folder = Path(tempfile.mkdtemp(prefix="mmlens-store-"))
    else:
        folder = Path(store_dir) / f"rank-{rank}"
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.mkdir(parents=True)
        except OSError as error:
            raise InputError(f"cannot create the activation store folder {folder} ({error.strerror}); set store_dir "
                             "to a writable folder with room for the logistic stores") from None
    previous = _exit_on_sigterm()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if store_dir is not None:
            try:
                folder.parent.rmdir()  # the run's store folder, once no rank uses it
            except OSError:
                pass
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm():
    """Make SIGTERM (what torchrun sends a rank when another fails, and what schedulers send
    first) raise SystemExit, so `finally` blocks run; returns the handler to put back, or None
    where Python cannot take signals (not the main thread) or someone else already handles it."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        return None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    return previous


class ActivationStore:
    """Activations of one site and their token labels, appended batch by batch to files on disk."""

    def __init__(self, d: int, n_label_sets: int, directory: str | Path | None = None, name: str = "site"):
        self._tmp = None if directory is not None else tempfile.TemporaryDirectory(prefix="mmlens-store-")
        root = Path(directory if directory is not None else self._tmp.name)
        root.mkdir(parents=True, exist_ok=True)
        safe = name.replace("/", "_")
        self.features_path = root / f"{safe}.features"
        self.labels_path = root / f"{safe}.labels.i32"
        self.d, self.n_label_sets, self.n, self.name = d, n_label_sets, 0, name
        self.sizes: list[int] = []  # rows of each append (one batch of images)
        self.dtypes: list[np.dtype] = []  # each append's storage: float16, or float32 beyond its range
        self._features = open(self.features_path, "wb")
        self._labels = open(self.labels_path, "wb")

    def append(self, x: Float[Tensor, "n d"], *labels: Int[Tensor, "n"], fold: Int[Tensor, "n"] | None = None) -> None:
        """Add tokens with one label per label set; `fold`: each token's cross-validation fold
        (its image's), kept beside the labels so a fit can leave a fold out."""
        if len(labels) != self.n_label_sets:
            raise ValueError(f"expected {self.n_label_sets} label sets, got {len(labels)}")
        x = x.detach().to("cpu")
        if not torch.isfinite(x).all():
            raise InputError(f"{self.name}: NaN or inf activations cannot be stored for the logistic probe; the "
                             "model overflows or its inputs hold NaN (run in float32 or bfloat16, check pixel_values)")
        half = x.to(torch.float16)
        fits = torch.isfinite(half)
        # beyond float16: float32 for this append, every value that fits still rounded to float16
        stored = half if fits.all() else torch.where(fits, half.float(), x.float())
        self._features.write(stored.numpy().tobytes())
        fold = torch.zeros(x.shape[0], dtype=torch.int32) if fold is None else fold
        stacked = torch.stack([y.cpu().to(torch.int32) for y in (*labels, fold)], dim=1)
        self._labels.write(stacked.numpy().tobytes())
        self.n += x.shape[0]
        self.sizes.append(x.shape[0])
        self.dtypes.append(stored.numpy().dtype)
        _kill_if_requested()

    def read(self) -> tuple[Float[Tensor, "n d"], Int[Tensor, "n label_sets"]]:
        """Everything appended so far (features as float32)."""
        self._features.flush()
        self._labels.flush()
        if self.n == 0:
            return torch.zeros(0, self.d), torch.zeros(0, self.n_label_sets, dtype=torch.long)
        with open(self.features_path, "rb") as stored:
            features = np.concatenate([np.fromfile(stored, dtype=dtype, count=m * self.d).reshape(m, self.d)
                                       .astype(np.float32) for m, dtype in zip(self.sizes, self.dtypes)])
        labels = np.fromfile(self.labels_path, dtype=np.int32).reshape(self.n, self.n_label_sets + 1)
        return torch.from_numpy(features), torch.from_numpy(labels[:, :-1]).long()

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
        pieces = [(min(rows, size - start), dtype) for size, dtype in zip(store.sizes, store.dtypes)
                  for start in range(0, size, rows)]
        columns = store.n_label_sets + 1
        with open(store.features_path, "rb") as stored, open(store.labels_path, "rb") as labels:
            for m, dtype in pieces:
                if features:
                    x = np.fromfile(stored, dtype=dtype, count=m * self.d).reshape(m, self.d)
                y = np.fromfile(labels, dtype=np.int32, count=m * columns).reshape(m, columns)
                keep = slice(None) if self.folds is None else np.isin(y[:, -1], self.folds)
                if not features:
                    yield None, y[keep, self.label_set]
                elif self.folds is None or keep.any():
                    yield torch.from_numpy(x[keep].astype(np.float32)), torch.from_numpy(y[keep, self.label_set].astype(np.int64))


def _kill_if_requested() -> None:
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    global _appends_in_process
    _appends_in_process += 1
    rank, _, count = wanted.partition(":")
    if rank == os.environ.get("RANK", "0") and count.isdigit() and _appends_in_process == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
