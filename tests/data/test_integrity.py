"""Split checks: a held-out image that copies a training image (exactly, or with noise, a shift of a
pixel or two, a change of brightness) is refused with the offending rows named; honest synthetic
scenes never are; training masks with one class are refused with the class named."""

from __future__ import annotations

import time

import numpy as np
import pytest
from datasets import Dataset

from mmlens.data import load_segmentation, segmentation_info
from mmlens.data.integrity import (
    NEAR_COPY_RMS, check_classes, check_split_independent, copy_pairs, near_copy_distance,
)
from mmlens.data.schema import attach_info, png_bytes
from mmlens.errors import InputError
from mmlens.probing.split import split_images

N = 40
TRAIN, TEST = np.arange(0, 30), np.arange(30, N)


@pytest.fixture(scope="module")
def scenes() -> Dataset:
    return load_segmentation("scenes", split="validation", n=N)


def _pixels(dataset: Dataset, row: int, column: str = "image") -> np.ndarray:
    return np.asarray(dataset[int(row)][column])


def _with(dataset: Dataset, **rows: dict[str, np.ndarray]) -> Dataset:
    """`dataset` with some rows' image and/or mask replaced (keys "r<row>"), in the same schema."""
    table = dataset.to_list()
    for key, columns in rows.items():
        for column, array in columns.items():
            table[int(key[1:])][column] = png_bytes(array)
    return attach_info(Dataset.from_list(table, features=dataset.features), segmentation_info(dataset))


def _noisy(image: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, std, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Content moved by (dy, dx) px, the uncovered edge repeated (as a re-crop would give)."""
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return padded[2 - dy:2 - dy + h, 2 - dx:2 - dx + w]


def _brighter(image: np.ndarray, add: float = 0, gain: float = 1) -> np.ndarray:
    return np.clip(image.astype(float) * gain + add, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- honest data passes
@pytest.mark.parametrize("n, image_size", [(300, None), (1200, None), (300, 64), (1200, 64)])
def test_honest_scenes_pass(n, image_size):
    """No false positive on the synthetic scenes under the sweep's own seeded split, fast."""
    dataset = load_segmentation("scenes", split="validation", n=n, image_size=image_size)
    train, test = split_images(n, 0.25, seed=0)
    start = time.perf_counter()
    assert copy_pairs(dataset, train, test) == []
    elapsed = time.perf_counter() - start
    check_split_independent(dataset, train, test)
    check_classes(dataset, train)
    assert elapsed < 30, f"{n} images took {elapsed:.1f} s"  # about 1 s for 1,200 on an idle core


def test_distinct_scenes_are_further_apart_than_the_threshold(scenes):
    images = [_pixels(scenes, i) for i in range(8)]
    distances = [near_copy_distance(a, b) for i, a in enumerate(images) for b in images[i + 1:]]
    assert min(distances) > 1.5 * NEAR_COPY_RMS


# ---------------------------------------------------------------- copies are caught
def test_repeated_row_is_refused_with_its_rows_named(scenes):
    copy = {"image": _pixels(scenes, 3), "mask": _pixels(scenes, 3, "mask")}
    dataset = _with(scenes, r35=copy)
    with pytest.raises(InputError) as error:
        check_split_independent(dataset, TRAIN, TEST)
    message = str(error.value)
    assert "rows 3 (train) and 35 (test): identical image" in message
    assert "Deduplicate the dataset" in message and "split" in message
    check_split_independent(dataset, np.delete(TRAIN, 3), TEST)  # without the original: fine


@pytest.mark.parametrize("change", [
    lambda x: _noisy(x, 4),
    lambda x: _noisy(x, 8, seed=1),
    lambda x: _shifted(x, 1, 0),
    lambda x: _shifted(x, -2, 2),
    lambda x: _brighter(x, add=15),
    lambda x: _brighter(x, add=-20),
    lambda x: _brighter(x, gain=1.12),
    lambda x: _noisy(_brighter(_shifted(x, 1, -1), add=10), 4),
], ids=["noise4", "noise8", "shift1", "shift2-diagonal", "brighter", "darker", "gain", "all"])
def test_near_copy_is_refused(scenes, change):
    """The copy keeps its own row's mask, so only the image can give it away."""
    image = _pixels(scenes, 7)
    dataset = _with(scenes, r33={"image": change(image)})
    pairs = copy_pairs(dataset, TRAIN, TEST)
    assert [(p.train_row, p.test_row, p.kind) for p in pairs] == [(7, 33, "near copy")]
    assert pairs[0].distance <= NEAR_COPY_RMS
    with pytest.raises(InputError, match=r"rows 7 \(train\) and 33 \(test\): near copy"):
        check_split_independent(dataset, TRAIN, TEST)


def test_near_copy_at_other_image_sizes():
    """A one- or two-pixel shift and noise are caught at 32 and 128 px too."""
    for size in (32, 128):
        dataset = load_segmentation("scenes", split="validation", n=N, image_size=size)
        image = _pixels(dataset, 2)
        for change in (lambda x: _shifted(x, 2, 1), lambda x: _noisy(_shifted(x, 1, 0), 6)):
            assert near_copy_distance(image, change(image)) <= NEAR_COPY_RMS


def test_identical_mask_is_refused(scenes):
    """A different picture with a training row's mask is a relabelled copy."""
    dataset = _with(scenes, r31={"mask": _pixels(scenes, 12, "mask")})
    assert [(p.train_row, p.test_row, p.kind) for p in copy_pairs(dataset, TRAIN, TEST)] == [(12, 31, "identical mask")]


def test_uniform_masks_repeat_without_complaint(scenes):
    """Masks with one class repeat in honest data (an empty scene), so they are not evidence."""
    empty = np.zeros_like(_pixels(scenes, 0, "mask"))
    dataset = _with(scenes, r1={"mask": empty}, r32={"mask": empty})
    check_split_independent(dataset, TRAIN, TEST)


def test_row_on_both_sides_is_refused(scenes):
    with pytest.raises(InputError, match=r"rows 4 \(train\) and 4 \(test\): same row"):
        check_split_independent(scenes, TRAIN, np.append(TEST, 4))


def test_copies_on_one_side_are_allowed(scenes):
    dataset = _with(scenes, r5={"image": _pixels(scenes, 6), "mask": _pixels(scenes, 6, "mask")})
    check_split_independent(dataset, TRAIN, TEST)
    with pytest.raises(InputError):
        check_split_independent(dataset, TRAIN[TRAIN != 6], np.append(TEST, 6))


def test_message_lists_a_few_pairs_and_counts_the_rest(scenes):
    rows = {f"r{30 + k}": {"image": _pixels(scenes, k)} for k in range(8)}
    with pytest.raises(InputError) as error:
        check_split_independent(_with(scenes, **rows), TRAIN, TEST)
    message = str(error.value)
    assert message.startswith("8 held-out image(s) are copies of training images (8 pair(s))")
    assert message.count("identical image") == 5 and "and 3 more pair(s)" in message


def test_bad_indices_are_refused(scenes):
    with pytest.raises(InputError, match=r"test_idx holds row\(s\) \[40\] outside the dataset's 40 rows"):
        check_split_independent(scenes, TRAIN, [39, 40])
    with pytest.raises(InputError, match="integer"):
        check_split_independent(scenes, TRAIN, [0.5])


# ---------------------------------------------------------------- classes
def test_training_masks_with_one_class_are_refused(scenes):
    """Background-only training masks: refused, naming the class, whatever the held-out masks hold."""
    empty = np.zeros_like(_pixels(scenes, 0, "mask"))
    dataset = _with(scenes, **{f"r{i}": {"mask": empty} for i in range(4)})
    check_classes(dataset, [0, 1, 2, 3, 30])
    with pytest.raises(InputError, match=r"masks hold one class only, 'background' \(id 0\).*mIoU 1\.000"):
        check_classes(dataset, [0, 1, 2, 3])


def test_one_object_class_and_ignore_is_one_class(scenes):
    mask = np.full_like(_pixels(scenes, 0, "mask"), 255)
    mask[:8, :8] = 3
    dataset = _with(scenes, r0={"mask": mask}, r1={"mask": mask})
    name = segmentation_info(scenes).class_names[3]
    with pytest.raises(InputError, match=f"one class only, '{name}' \\(id 3\\)"):
        check_classes(dataset, [0, 1])


def test_no_labelled_pixel_is_refused(scenes):
    ignored = np.full_like(_pixels(scenes, 0, "mask"), 255)
    with pytest.raises(InputError, match="no labelled pixel"):
        check_classes(_with(scenes, r0={"mask": ignored}), [0])
