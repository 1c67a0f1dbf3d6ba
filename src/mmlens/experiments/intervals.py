"""Per-image counts and their bootstrap intervals, shared by the experiments.

Experiments keep, per image, the counts a statistic is made of (correct and scored tokens; TP,
FP and FN per class). A statistic is recomputed on every bootstrap resample of the images, and
differences between conditions use the same resamples (paired), so their intervals are honest
about the image-to-image spread.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..probing.metrics import miou_from_counts
from ..resampling import percentile_interval  # noqa: F401  (re-exported: the studies import it from here)


def pooled_accuracy(correct: np.ndarray, scored: np.ndarray, index: np.ndarray | None = None) -> float:
    """Accuracy over all tokens of the chosen images (a ratio of sums, not a mean of ratios)."""
    if index is not None:
        correct, scored = correct[index], scored[index]
    total = scored.sum()
    return float(correct.sum() / total) if total else float("nan")


def pooled_miou(counts: np.ndarray, index: np.ndarray | None = None, classes: Sequence[int] | None = None) -> float:
    """mIoU from per-image [tp, fp, fn] x class counts (`counts`: [n_images, 3, n_classes]),
    optionally over a subset of classes."""
    total = (counts if index is None else counts[index]).sum(0)
    if classes is not None:
        total = total[:, list(classes)]
    return miou_from_counts(total)


