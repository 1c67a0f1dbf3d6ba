"""Checks that a train/test split can be scored honestly: no held-out image copies a training image,
and the training masks hold at least two classes.

Each image is decoded once, hashed (exact copies), and reduced to a blurred 32x32 canvas; a cheap
pass over 6x6 summaries picks candidate pairs, and a candidate is a near copy when, at the best
shift within 2 canvas px, gain and offset of brightness, the canvases differ by at most
`NEAR_COPY_RMS` grey levels RMS. Binary perceptual hashes were measured and rejected: on the
scenes' smooth backgrounds light noise flips more bits than separate distinct scenes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from datasets import Dataset
from PIL import Image as PILImage

from ..errors import InputError
from .schema import IGNORE_INDEX, segmentation_info

CANVAS = 32  # side every image is compared at
BLUR_SIGMA = 1.5  # canvas px: keeps layout and colour, removes pixel noise, JPEG blocks and stripe textures
MAX_SHIFT = 2  # canvas px each way (2 px of a 32 px image, 8 of a 128 px one)
MAX_GAIN = 1.25  # brightness gain allowed between copies (and 1 / MAX_GAIN)
MAX_OFFSET = 32.0  # grey levels of brightness offset allowed between copies
# Measured on the synthetic scenes (32 to 128 px, 1,200 images each): copies with a 1-2 px shift,
# +-25 grey levels or gain 1.15 stay below 1.3, with Gaussian noise of std 8 below 1.8 (std 15:
# 1.6 from 64 px up, 3.2 at 32 px); the closest two distinct scenes are 4.0 apart.
NEAR_COPY_RMS = 2.5
# The cheap pass: 6x6 summaries (gain and offset fitted, best whole-pixel shift) within this RMS.
# The copies above stay below 8; about 1 pair of distinct scenes in 2,000 is this close.
CANDIDATE_RMS = 12.0
SUMMARY = 6  # cells a side of the cheap pass's summaries (4 canvas px each)
_STEP = 4  # the aligned comparison's shifts are multiples of 1 / _STEP canvas px
_BORDER = 4  # canvas px left out: room for the shifts, and the blur's mirrored edge
_LISTED = 5  # pairs named in an error

Kind = Literal["same row", "identical image", "identical mask", "near copy"]


@dataclass(frozen=True)
class CopyPair:
    """A training row and a held-out row whose images (or masks) are copies of each other."""

    train_row: int
    test_row: int
    kind: Kind
    distance: float  # RMS grey levels left after alignment (0 for exact copies)

    def describe(self, threshold: float = NEAR_COPY_RMS) -> str:
        what = self.kind if self.kind != "near copy" else (
            f"near copy (differs by {self.distance:.2f} grey levels RMS after alignment; threshold {threshold:g})")
        return f"rows {self.train_row} (train) and {self.test_row} (test): {what}"


def check_split_independent(dataset: Dataset, train_idx: Iterable[int], test_idx: Iterable[int], *,
                            threshold: float = NEAR_COPY_RMS) -> None:
    """Refuse (InputError) a split where a held-out image is a copy of a training image: the same
    row, identical pixels, an identical mask with two or more classes, or a near copy (noise, a
    shift of a pixel or two, a change of brightness); the message names a few pairs."""
    pairs = copy_pairs(dataset, train_idx, test_idx, threshold=threshold)
    if not pairs:
        return
    n_test = len({p.test_row for p in pairs})
    listed = "; ".join(p.describe(threshold) for p in pairs[:_LISTED])
    more = f"; and {len(pairs) - _LISTED} more pair(s)" if len(pairs) > _LISTED else ""
    raise InputError(
        f"{n_test} held-out image(s) are copies of training images ({len(pairs)} pair(s)), so held-out scores "
        f"would measure memory, not what the probe reads: {listed}{more}. Deduplicate the dataset (keep one row "
        f"of each pair) or pass a split that keeps each pair on one side"
    )


def check_classes(dataset: Dataset, train_idx: Iterable[int]) -> None:
    """Refuse (InputError) training images whose masks hold fewer than two classes: a probe fitted
    on one class predicts it everywhere and scores mIoU 1.000 at every site."""
    rows = _rows_checked(dataset, train_idx, "train_idx")
    names, ignore = _class_names(dataset)
    found: set[int] = set()
    for row in _read(dataset, rows, ["mask"]):
        found.update(_classes(np.asarray(row["mask"]), ignore, len(names) if names else None))
        if len(found) >= 2:  # enough: stop decoding
            return
    if not found:
        raise InputError(
            f"the {len(rows)} training image(s) have no labelled pixel (every mask pixel is the ignore index "
            f"{ignore} or outside the class list): there is nothing to fit a probe on; check the masks and the "
            f"dataset's ignore index"
        )
    (cls,) = found
    name = f"{names[cls]!r} (id {cls})" if names and cls < len(names) else f"id {cls}"
    raise InputError(
        f"the {len(rows)} training image(s)' masks hold one class only, {name}: a probe fitted on one class "
        f"predicts it everywhere and scores mIoU 1.000 at every site. Use a dataset whose masks hold at least "
        f"two classes, or more or other training images"
    )


def copy_pairs(dataset: Dataset, train_idx: Iterable[int], test_idx: Iterable[int], *,
               threshold: float = NEAR_COPY_RMS) -> list[CopyPair]:
    """Every (training row, held-out row) pair that is a copy, exact ones first, then near copies
    by distance; one entry per pair (the strongest reason)."""
    train = _rows_checked(dataset, train_idx, "train_idx")
    test = _rows_checked(dataset, test_idx, "test_idx")
    found: dict[tuple[int, int], CopyPair] = {}

    def add(pair: CopyPair) -> None:
        found.setdefault((pair.train_row, pair.test_row), pair)

    for row in sorted(set(train.tolist()) & set(test.tolist())):
        add(CopyPair(row, row, "same row", 0.0))
    train_prints, test_prints = _fingerprints(dataset, train), _fingerprints(dataset, test)
    for kind, key in (("identical image", "image"), ("identical mask", "mask")):
        by_hash: dict[bytes, list[int]] = {}
        for row, digest in zip(train, train_prints[key]):
            if digest is not None:
                by_hash.setdefault(digest, []).append(int(row))
        for row, digest in zip(test, test_prints[key]):
            for match in by_hash.get(digest, []) if digest is not None else []:
                add(CopyPair(match, int(row), kind, 0.0))
    for i, j, distance in _near_copies(train_prints["canvas"], test_prints["canvas"], threshold):
        add(CopyPair(int(train[i]), int(test[j]), "near copy", distance))
    order = {"same row": 0, "identical image": 1, "identical mask": 2, "near copy": 3}
    return sorted(found.values(), key=lambda p: (order[p.kind], p.distance, p.test_row, p.train_row))


def near_copy_distance(image_a: Any, image_b: Any) -> float:
    """How far `image_b` is from being a copy of `image_a` (PIL images or HxWx3 uint8 arrays): RMS
    grey levels left after the best alignment, gain and offset; copies are <= `NEAR_COPY_RMS`."""
    return float(_aligned_distances(_canvas(image_a)[None], _canvas(image_b))[0])


# ---------------------------------------------------------------- fingerprints
def _fingerprints(dataset: Dataset, rows: np.ndarray) -> dict[str, list]:
    """Per row: hash of the pixels, hash of the mask (None when it has fewer than two classes, as
    an empty mask repeats in honest data), and the blurred canvas (float16: 6 KB an image)."""
    _, ignore = _class_names(dataset)
    images, masks = [], []
    canvases = np.empty((len(rows), 3, CANVAS, CANVAS), dtype=np.float16)
    for k, row in enumerate(_read(dataset, rows, ["image", "mask"])):
        image = row["image"]
        pixels = np.asarray(image.convert("RGB") if isinstance(image, PILImage.Image) else image)
        images.append(_digest(pixels))
        mask = np.asarray(row["mask"])
        masks.append(_digest(mask) if len(_classes(mask, ignore, None)) >= 2 else None)
        canvases[k] = _canvas(pixels)
    return {"image": images, "mask": masks, "canvas": canvases}


def _digest(array: np.ndarray) -> bytes:
    return hashlib.blake2b(array.tobytes() + repr((array.shape, array.dtype.str)).encode(), digest_size=16).digest()


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] Gaussian blur along one axis with mirrored edges (rows sum to 1)."""
    radius = int(np.ceil(3 * sigma))
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    matrix = np.zeros((n, n))
    for i in range(n):
        j = i + offsets
        j = np.where(j < 0, -j - 1, np.where(j >= n, 2 * n - j - 1, j))  # half-sample mirror
        np.add.at(matrix[i], j, weights)
    return (matrix / matrix.sum(1, keepdims=True)).astype(np.float32)


_BLUR = _blur_matrix(CANVAS, BLUR_SIGMA)


def _canvas(image: Any) -> np.ndarray:
    """[3, CANVAS, CANVAS] float32: the image resized (area average) and blurred."""
    pil = image if isinstance(image, PILImage.Image) else PILImage.fromarray(np.asarray(image, dtype=np.uint8))
    pil = pil.convert("RGB")
    if pil.size != (CANVAS, CANVAS):
        pil = pil.resize((CANVAS, CANVAS), PILImage.Resampling.BOX)
    x = np.asarray(pil, dtype=np.float32).transpose(2, 0, 1)
    return _BLUR @ x @ _BLUR.T


# ---------------------------------------------------------------- near copies
def _fit(dot: np.ndarray, sq_a: np.ndarray, sq_b: np.ndarray, mean_a: np.ndarray, mean_b: np.ndarray) -> np.ndarray:
    """Mean squared residual of b - (g a + c), from the centred moments (dot: mean of a_c * b_c,
    sq: mean of squares) and the means, with gain g and offset c clipped to what a change of
    brightness does; everything broadcasts."""
    gain = np.clip(dot / np.maximum(sq_a, 1e-6), 1 / MAX_GAIN, MAX_GAIN)
    offset = mean_b - gain * mean_a
    excess = offset - np.clip(offset, -MAX_OFFSET, MAX_OFFSET)
    return np.maximum(sq_b - 2 * gain * dot + gain**2 * sq_a, 0) + excess**2


def _residuals(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] RMS residual of each row of `b` fitted by each row of `a` (flat pictures)."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    mean_a, mean_b = a.mean(1), b.mean(1)
    a, b = a - mean_a[:, None], b - mean_b[:, None]
    dot = (a @ b.T) / a.shape[1]
    return np.sqrt(_fit(dot, (a * a).mean(1)[:, None], (b * b).mean(1)[None], mean_a[:, None], mean_b[None]))


def _interior(canvases: np.ndarray, dy: float = 0, dx: float = 0, step: int = 1) -> np.ndarray:
    """[n, 3 * side * side]: the interiors of canvases given on a grid `step` times finer than the
    canvas (see `_upsample`), moved by (dy, dx) canvas px, multiples of 1 / step."""
    side = CANVAS - 2 * _BORDER
    y0, x0 = round((_BORDER + dy) * step), round((_BORDER + dx) * step)
    span = (side - 1) * step + 1
    return canvases[..., y0:y0 + span:step, x0:x0 + span:step].reshape(len(canvases), -1)


def _upsample(x: np.ndarray, step: int) -> np.ndarray:
    """[n, 3, (s - 1) * step + 1, same]: bilinear on a grid `step` times finer."""
    n, c, s, _ = x.shape
    t = np.arange((s - 1) * step + 1) / step
    lo = np.minimum(t.astype(int), s - 2)
    w = (t - lo).astype(np.float32)
    rows = x[:, :, lo] * (1 - w)[:, None] + x[:, :, lo + 1] * w[:, None]
    return rows[..., lo] * (1 - w) + rows[..., lo + 1] * w


def _summaries(interiors: np.ndarray) -> np.ndarray:
    """[n, 3 * SUMMARY**2]: area averages of the interiors over a SUMMARY x SUMMARY grid."""
    side = CANVAS - 2 * _BORDER
    cells = side // SUMMARY
    x = interiors.reshape(len(interiors), 3, side, side)[:, :, :cells * SUMMARY, :cells * SUMMARY]
    return x.reshape(len(x), 3, SUMMARY, cells, SUMMARY, cells).mean((3, 5)).reshape(len(x), -1)


def _shifts(step: int) -> list[tuple[float, float]]:
    steps = np.arange(-MAX_SHIFT * step, MAX_SHIFT * step + 1) / step
    return [(float(dy), float(dx)) for dy in steps for dx in steps]


def _candidates(train: np.ndarray, test: np.ndarray, chunk: int = 256) -> Iterator[tuple[int, np.ndarray]]:
    """(test position, training positions) whose summaries, at the best whole-pixel shift, are
    within CANDIDATE_RMS: a cheap pass that leaves few pairs for the aligned comparison."""
    a = _summaries(_interior(train.astype(np.float32)))
    for start in range(0, len(test), chunk):  # [n_train, chunk] at a time: memory stays flat
        part = test[start:start + chunk].astype(np.float32)
        best = np.full((len(a), len(part)), np.inf, dtype=np.float32)
        for dy, dx in _shifts(1):
            np.minimum(best, _residuals(a, _summaries(_interior(part, dy, dx))), out=best)
        for j in range(len(part)):
            hits = np.flatnonzero(best[:, j] <= CANDIDATE_RMS)
            if len(hits):
                yield start + j, hits


def _aligned_distances(train: np.ndarray, test_canvas: np.ndarray) -> np.ndarray:
    """[n_train]: RMS residual between each training canvas's interior and the held-out canvas at
    the best shift (quarter-pixel steps, bilinear: exact enough on a blurred canvas), gain and offset."""
    fine = _upsample(test_canvas[None].astype(np.float32), _STEP)
    windows = np.concatenate([_interior(fine, dy, dx, _STEP) for dy, dx in _shifts(_STEP)])
    return _residuals(_interior(train), windows).min(1)


def _near_copies(train: np.ndarray, test: np.ndarray, threshold: float) -> Iterator[tuple[int, int, float]]:
    if len(train) == 0 or len(test) == 0:
        return
    for j, hits in _candidates(train, test):
        for i, distance in zip(hits, _aligned_distances(train[hits], test[j])):
            if distance <= threshold:
                yield int(i), j, float(distance)


# ---------------------------------------------------------------- rows and classes
def _rows_checked(dataset: Dataset, indices: Iterable[int], what: str) -> np.ndarray:
    rows = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices).reshape(-1)
    if rows.size and not np.issubdtype(rows.dtype, np.integer):
        raise InputError(f"{what} must hold integer dataset row numbers, got dtype {rows.dtype}")
    rows = rows.astype(np.int64)
    bad = rows[(rows < 0) | (rows >= len(dataset))]
    if len(bad):
        raise InputError(f"{what} holds row(s) {bad[:_LISTED].tolist()} outside the dataset's {len(dataset)} rows; "
                         f"pass row numbers 0..{len(dataset) - 1}")
    return rows


def _read(dataset: Dataset, rows: np.ndarray, columns: list[str]) -> Iterator[dict]:
    """The rows' `columns`, each decoded once, in the order of `rows`."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise InputError(f"the dataset has no {missing} column(s) (it has {dataset.column_names}); "
                         f"load it with mmlens.data.load_segmentation or build it in mmlens's schema")
    if len(rows) == 0:
        return iter(())
    return iter(dataset.select_columns(columns).select(rows.tolist()))


def _class_names(dataset: Dataset) -> tuple[tuple[str, ...] | None, int]:
    try:
        info = segmentation_info(dataset)
    except ValueError:  # not mmlens's schema: ids only
        return None, IGNORE_INDEX
    return info.class_names, info.ignore_index


def _classes(mask: np.ndarray, ignore: int, n_classes: int | None) -> set[int]:
    """Class ids present in `mask`, without the ignore index (and ids past the class list)."""
    values = np.flatnonzero(np.bincount(mask.ravel(), minlength=1)) if mask.dtype == np.uint8 else np.unique(mask)
    return {int(v) for v in values if v != ignore and v >= 0 and (n_classes is None or v < n_classes)}
