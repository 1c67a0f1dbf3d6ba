"""Synthetic scenes: determinism, split streams, exact occlusion, look-alike pairs, metadata."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from datasets import Dataset, Image as ImageFeature, load_from_disk

from mmlens.data import (
    load_segmentation,
    lookalike_pairs,
    render_scene,
    scene_class_names,
    segmentation_info,
)
from mmlens.data.scenes import COLOURS, scene_classes, scene_rng, shape_mask


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("scene_cache"))


def _scenes(cache, **kwargs) -> Dataset:
    return load_segmentation("scenes", cache_dir=cache, **kwargs)


def _png_bytes(ds: Dataset, column: str) -> list[bytes]:
    return [cell["bytes"] for cell in ds.cast_column(column, ImageFeature(decode=False))[column]]


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


def test_class_names_pair_colour_and_texture_but_not_shape():
    names = scene_class_names()
    assert names[0] == "background" and len(names) == 9 and len(set(names)) == 9
    assert names[1:3] == ("red_circle", "red_square")
    for a, b in lookalike_pairs():
        colour_a, shape_a = a.split("_")
        colour_b, shape_b = b.split("_")
        assert colour_a == colour_b and shape_a != shape_b
    assert len(scene_class_names(16)) == 17 and len(set(scene_class_names(16))) == 17
    assert len(scene_class_names(3)) == 4
    with pytest.raises(ValueError, match="k"):
        scene_class_names(17)


def test_render_is_a_pure_function_of_seed_split_index():
    first = render_scene(scene_rng(0, "train", 5), 64)
    again = render_scene(scene_rng(0, "train", 5), 64)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert first[2] == again[2]
    other_seed = render_scene(scene_rng(1, "train", 5), 64)
    assert not np.array_equal(first[0], other_seed[0])


def test_dataset_bytes_identical_across_loads_and_differ_across_seeds(tmp_path):
    # Separate cache dirs: the second load must regenerate, not read the first one's cache.
    one = _scenes(str(tmp_path / "a"), n=6, seed=3)
    two = _scenes(str(tmp_path / "b"), n=6, seed=3)
    assert _png_bytes(one, "image") == _png_bytes(two, "image")
    assert _png_bytes(one, "mask") == _png_bytes(two, "mask")
    assert one["objects"] == two["objects"]
    other = _scenes(str(tmp_path / "a"), n=6, seed=4)
    assert not set(_png_bytes(one, "image")) & set(_png_bytes(other, "image"))
    assert not set(one["id"]) & set(other["id"])


def test_ids_and_images_stable_across_n_and_start(cache):
    small = _scenes(cache, n=4)
    large = _scenes(cache, n=10)
    assert large["id"][:4] == small["id"] and len(set(large["id"])) == 10
    assert _png_bytes(large, "image")[:4] == _png_bytes(small, "image")
    assert large["id"] == sorted(large["id"])
    window = _scenes(cache, n=3, start=5)
    assert window["id"] == large["id"][5:8]
    assert _png_bytes(window, "image") == _png_bytes(large, "image")[5:8]


def test_splits_are_disjoint_streams(cache):
    digests, ids = {}, {}
    for split in ("train", "validation", "test"):
        ds = _scenes(cache, split=split, n=40)
        ids[split] = set(ds["id"])
        digests[split] = {_digest(np.asarray(image)) for image in ds["image"]}
        assert len(digests[split]) == 40
        assert ds.split == split
    assert not digests["train"] & digests["validation"]
    assert not digests["train"] & digests["test"]
    assert not digests["validation"] & digests["test"]
    assert not ids["train"] & ids["validation"]
    assert _scenes(cache, split="val", n=2)["id"] == sorted(ids["validation"])[:2]
    with pytest.raises(ValueError, match="split"):
        _scenes(cache, split="holdout", n=1)


def test_schema_modes_values_and_classes_column(cache):
    ds = _scenes(cache, n=30, image_size=48)
    info = segmentation_info(ds)
    assert info.name == "scenes" and info.image_size == 48 and info.ignore_index == 255
    for example in ds:
        image, mask = example["image"], example["mask"]
        assert image.mode == "RGB" and image.size == (48, 48)
        assert mask.mode == "L" and mask.size == (48, 48)
        values = np.asarray(mask)
        assert values.max() <= 8
        assert example["classes"] == np.unique(values).tolist()
        assert 1 <= len(example["objects"]) <= 4
        for obj in example["objects"]:
            assert obj["class_name"] == info.class_names[obj["class_id"]]
            assert obj["class_name"] == f"{obj['colour']}_{obj['shape']}"
            assert 0 <= obj["x"] <= 1 and 0 <= obj["y"] <= 1
            assert 0.3 - 1e-6 <= obj["visibility"] <= 1
            assert 0.14 * 48 - 1e-3 <= obj["size"] * 48 <= 0.31 * 48 + 1e-3


def _chromaticity(pixels: np.ndarray) -> np.ndarray:
    pixels = pixels.astype(np.float64)
    return pixels / np.maximum(pixels.sum(-1, keepdims=True), 1)


def test_mask_is_the_topmost_object_and_matches_its_colour():
    colour_names = list(COLOURS)
    references = _chromaticity(np.array([COLOURS[name] for name in colour_names]))
    for index in range(40):
        image, mask, objects = render_scene(scene_rng(7, "train", index), 64, k=16)
        # Repaint the stored scene description back to front: it must reproduce the mask.
        painted = np.zeros_like(mask)
        owner = np.full(mask.shape, -1)
        for j, obj in enumerate(objects):
            drawn = shape_mask(obj["shape"], obj["x"] * 64, obj["y"] * 64, obj["size"] * 64,
                               math.radians(obj["angle"]), 64)  # fmt: skip
            painted[drawn] = obj["class_id"]
            owner[drawn] = j
            obj["_drawn"] = drawn.sum()
        np.testing.assert_array_equal(painted, mask)
        for j, obj in enumerate(objects):
            assert obj["visibility"] == pytest.approx((owner == j).sum() / obj["_drawn"])
        # Every object pixel has the chromaticity of its class's colour; background is grey.
        saturation = image.max(-1).astype(int) - image.min(-1)
        foreground = mask > 0
        assert saturation[foreground].min() > 80 > saturation[~foreground].max()
        nearest = np.argmin(
            ((_chromaticity(image[foreground])[:, None] - references[None]) ** 2).sum(-1), axis=1
        )
        classes = scene_classes(16)
        expected = np.array([colour_names.index(classes[c - 1].colour) for c in mask[foreground]])
        np.testing.assert_array_equal(nearest, expected)


def _interior_patch_stats(k: int = 8, scenes: int = 300, patch: int = 8) -> dict[int, np.ndarray]:
    """Per class, stats of every 8x8 window lying entirely inside one class region."""
    stats: dict[int, list] = {c: [] for c in range(1, k + 1)}
    for index in range(scenes):
        image, mask, _ = render_scene(scene_rng(11, "train", index), 64, k=k)
        image = image.astype(np.float64)
        for top in range(0, 64 - patch + 1, 2):
            for left in range(0, 64 - patch + 1, 2):
                window = mask[top : top + patch, left : left + patch]
                label = window[0, 0]
                if label == 0 or not (window == label).all():
                    continue
                pixels = image[top : top + patch, left : left + patch]
                luminance = pixels.mean(-1)
                stats[label].append(np.r_[
                    pixels.reshape(-1, 3).mean(0),  # colour
                    luminance.std(),  # stripe contrast
                    np.abs(np.diff(luminance, axis=0)).mean(),  # stripe orientation:
                    np.abs(np.diff(luminance, axis=1)).mean(),  # vertical vs horizontal change
                ])  # fmt: skip
    return {label: np.array(rows) for label, rows in stats.items()}


def test_lookalike_pairs_share_colour_and_texture_statistics_in_interiors():
    stats = _interior_patch_stats()
    means = {label: rows.mean(0) for label, rows in stats.items()}
    for label, rows in stats.items():
        assert len(rows) >= 30, f"class {label} has too few interior patches"
    for first in (1, 3, 5, 7):  # the pairs (1, 2), (3, 4), ...
        a, b = means[first], means[first + 1]
        assert np.abs(a[:3] - b[:3]).max() < 8, (first, a, b)  # same colour
        assert np.abs(a[3:] - b[3:]).max() < 2.5, (first, a, b)  # same texture
    # Different colours differ by far more, so the closeness above is not a weak test.
    assert np.abs(means[1][:3] - means[3][:3]).max() > 60
    assert np.abs(means[3][:3] - means[5][:3]).max() > 60


@pytest.mark.parametrize(
    "operation", ["select", "train_test_split", "save_to_disk", "filter", "parquet"]
)
def test_metadata_survives_dataset_operations(cache, tmp_path, operation):
    ds = _scenes(cache, n=8, k=6, image_size=32)
    info = segmentation_info(ds)
    assert info.class_names == scene_class_names(6) and info.image_size == 32
    if operation == "select":
        assert segmentation_info(ds.select([3, 1])) == info
    elif operation == "train_test_split":
        parts = ds.train_test_split(test_size=0.25, seed=0)
        assert segmentation_info(parts["train"]) == info == segmentation_info(parts["test"])
        assert segmentation_info(parts) == info
    elif operation == "save_to_disk":
        ds.save_to_disk(str(tmp_path / "saved"))
        loaded = load_from_disk(str(tmp_path / "saved"))
        assert segmentation_info(loaded) == info
        assert _png_bytes(loaded, "mask") == _png_bytes(ds, "mask")
    elif operation == "filter":
        assert segmentation_info(ds.filter(lambda e: 1 in e["classes"])) == info
    else:
        # Parquet keeps features but not the description: class names must still come back.
        ds.to_parquet(str(tmp_path / "scenes.parquet"))
        restored = Dataset.from_parquet(str(tmp_path / "scenes.parquet"),
                                        cache_dir=str(tmp_path / "pq"))  # fmt: skip
        assert segmentation_info(restored).class_names == info.class_names


def test_segmentation_info_rejects_foreign_datasets():
    with pytest.raises(ValueError, match="not an mmlens segmentation dataset"):
        segmentation_info(Dataset.from_dict({"x": [1]}))


def test_render_options_pass_through_and_typos_fail_early(cache):
    ds = _scenes(cache, n=5, max_objects=1, k=2)
    assert [len(objects) for objects in ds["objects"]] == [1] * 5
    assert segmentation_info(ds).class_names == ("background", "red_circle", "red_square")
    with pytest.raises(TypeError, match="unknown scenes options"):
        _scenes(cache, n=2, max_object=3)
