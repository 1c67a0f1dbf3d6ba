"""The seeded train/test split by image that every probe-based study uses.

Images, not tokens, are split, so no held-out image lends tokens to training. Each side needs at
least `MIN_IMAGES_PER_SIDE` images: a probe needs more than one training image to be more than a
memorised scene, and a bootstrap interval over one test image has zero width, which would
present a single image's number as certain.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

MIN_IMAGES_PER_SIDE = 2


def split_sizes(n_images: int, test_fraction: float) -> tuple[int, int]:
    """(train, test) image counts for `n_images`; `InputError` when either side gets too few."""
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    n_test = max(1, int(round(n_images * test_fraction)))
    n_train = n_images - n_test
    if min(n_train, n_test) < MIN_IMAGES_PER_SIDE:
        need = minimum_images(test_fraction)
        raise InputError(
            f"{n_images} images split {n_train} train / {n_test} test at test_fraction {test_fraction}; each side "
            f"needs at least {MIN_IMAGES_PER_SIDE} images (a one-image test set has no interval). "
            f"Use at least {need} images at this test_fraction"
        )
    return n_train, n_test


def minimum_images(test_fraction: float) -> int:
    """The smallest dataset size `split_sizes` accepts at `test_fraction`."""
    n = 2 * MIN_IMAGES_PER_SIDE
    while True:
        n_test = max(1, int(round(n * test_fraction)))
        if min(n - n_test, n_test) >= MIN_IMAGES_PER_SIDE:
            return n
        n += 1


def split_images(n_images: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) dataset rows, seeded."""
    _, n_test = split_sizes(n_images, test_fraction)
    order = np.random.default_rng(seed).permutation(n_images)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


__all__ = ["MIN_IMAGES_PER_SIDE", "minimum_images", "split_images", "split_sizes"]
