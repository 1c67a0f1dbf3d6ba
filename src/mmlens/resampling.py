"""Bootstrap resamples of images: how many, and from which seed.

Every interval mmlens reports is a percentile interval over resamples of images (with
replacement, the same resamples for every quantity that is compared, so differences are paired).
Percentile tails from a few hundred resamples move in the second decimal from one seed to the
next, so the default is 2,000 and fewer than 1,000 are refused: an interval that changes with the
resampling seed is not one a finding can rest on.
"""

from __future__ import annotations

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


__all__ = ["DEFAULT_N_BOOT", "MIN_N_BOOT", "bootstrap_indices", "check_n_boot"]
