"""Bootstrap resamples of images: how many, and from which seed.

Every interval mmlens reports is a percentile interval over resamples of images (with
replacement, the same resamples for every quantity that is compared, so differences are paired).
Percentile tails from a few hundred resamples move in the second decimal from one seed to the
next, so the default is 2,000 and fewer than 1,000 are refused: an interval that changes with the
resampling seed is not one a finding can rest on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InputError

DEFAULT_N_BOOT = 2000
MIN_N_BOOT = 1000


def check_n_boot(n_boot: int) -> int:
    """`n_boot`, after refusing counts too small for stable 95% percentile tails."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < MIN_N_BOOT:
        raise InputError(
            f"n_boot={n_boot!r}: a 95% interval needs at least {MIN_N_BOOT} bootstrap resamples (its 2.5% tails "
            f"rest on 25 of them); the default is {DEFAULT_N_BOOT}. Raise n_boot"
        )
    return int(n_boot)


def bootstrap_indices(n_images: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_images] image indices drawn with replacement, seeded."""
    check_n_boot(n_boot)
    return np.random.default_rng(seed).integers(0, n_images, size=(n_boot, n_images))


def resample_counts(resamples: np.ndarray, n_images: int) -> np.ndarray:
    """[n_resamples, n_images]: how often each resample drew each image, so that
    `resample_counts(...) @ per_image_values` is every resample's total at once (exact for integer
    counts in float64)."""
    counts = np.zeros((len(resamples), n_images))
    np.add.at(counts, (np.repeat(np.arange(len(resamples)), resamples.shape[1]), resamples.ravel()), 1.0)
    return counts


def percentile_interval(samples: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap samples (NaN samples left out; NaN, NaN
    when every sample is NaN)."""
    samples = np.asarray(samples, dtype=float)
    if np.all(np.isnan(samples)):
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    return float(np.nanpercentile(samples, tail)), float(np.nanpercentile(samples, 100 - tail))


__all__ = ["DEFAULT_N_BOOT", "MIN_N_BOOT", "bootstrap_indices", "check_n_boot", "percentile_interval", "resample_counts"]
