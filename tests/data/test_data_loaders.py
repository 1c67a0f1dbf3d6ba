"""Folder loaders (ADE20K, VOC, Cityscapes) and the hub loader on tiny fakes in official formats."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, Features, Image as ImageFeature, ClassLabel
from PIL import Image

from mmlens.data import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    VOC_CLASSES,
    HubUnavailableError,
    load_segmentation,
    segmentation_info,
)
from mmlens.data import scene_parse_150
from mmlens.data.cityscapes import LABEL_TO_TRAIN_ID
from mmlens.data.voc import voc_palette


def _rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _blocky(rng: np.random.Generator, height: int, width: int, values, block: int = 4):
    """Labels constant on block x block tiles, so nearest resizing by 2 has a known answer."""
    tiles = rng.choice(np.asarray(values, dtype=np.uint8), size=(height // block, width // block))
    return np.kron(tiles, np.ones((block, block), dtype=np.uint8))


def _mask_of(example) -> np.ndarray:
    assert example["mask"].mode == "L"
    return np.asarray(example["mask"])


# ---------------------------------------------------------------- fake official folder layouts


def make_ade20k(root: Path, split_folder: str = "validation", n: int = 3, size=(48, 64)):
    """ADEChallengeData2016 layout; returns {stem: raw annotation}."""
    rng = np.random.default_rng(1)
    (root / "images" / split_folder).mkdir(parents=True)
    (root / "annotations" / split_folder).mkdir(parents=True)
    raw = {}
    for i in reversed(range(n)):  # written out of order: loaders must sort
        stem = f"ADE_{'train' if split_folder == 'training' else 'val'}_{i + 1:08d}"
        Image.fromarray(_rgb(rng, *size)).save(root / "images" / split_folder / f"{stem}.jpg")
        # Every raw value that matters: 0 (other), 1, 150 and values in between.
        annotation = _blocky(rng, *size, [0, 1, 2, 75, 149, 150])
        annotation_path = root / "annotations" / split_folder / f"{stem}.png"
        Image.fromarray(annotation, mode="L").save(annotation_path)
        raw[stem] = annotation
    return raw


def make_voc(root: Path, size=(40, 56)):
    """VOCdevkit/VOC2012 layout with real palette PNGs and 255 borders; returns {id: labels}."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    rng = np.random.default_rng(2)
    labels = {}
    ids = {"train": ["2007_000039", "2007_000032"],
           "val": ["2008_000002", "2007_000033", "2007_000042"]}  # fmt: skip
    for split, split_ids in ids.items():
        list_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
        list_file.write_text("\n".join(split_ids) + "\n")
        for image_id in split_ids:
            Image.fromarray(_rgb(rng, *size)).save(voc / "JPEGImages" / f"{image_id}.jpg")
            mask = _blocky(rng, *size, list(range(21)))
            mask[:2, :] = mask[-2:, :] = mask[:, :2] = mask[:, -2:] = 255  # the void border
            png = Image.fromarray(mask, mode="P")
            png.putpalette(voc_palette().ravel().tolist())
            png.save(voc / "SegmentationClass" / f"{image_id}.png")
            labels[image_id] = mask
    return labels


def make_cityscapes(root: Path, split: str = "val", size=(32, 64)):
    """leftImg8bit/gtFine layout; returns {id: raw labelIds}."""
    rng = np.random.default_rng(3)
    raw = {}
    cities = {"frankfurt": ["000000_000294", "000000_000576"], "lindau": ["000000_000019"]}
    for city, frames in cities.items():
        images, labels = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for frame in frames:
            stem = f"{city}_{frame}"
            Image.fromarray(_rgb(rng, *size)).save(images / f"{stem}_leftImg8bit.png")
            label_ids = _blocky(rng, *size, list(range(34)))
            Image.fromarray(label_ids, mode="L").save(labels / f"{stem}_gtFine_labelIds.png")
            # The other gtFine files of the release must be ignored.
            Image.fromarray(label_ids, mode="L").save(labels / f"{stem}_gtFine_instanceIds.png")
            raw[f"{city}/{stem}"] = label_ids
    return raw


def _load(name, root, tmp_path, **kwargs):
    kwargs.setdefault("image_size", None)
    return load_segmentation(name, path=root, cache_dir=str(tmp_path / "cache"), **kwargs)


# ---------------------------------------------------------------------------------- ADE20K


def test_ade20k_label_mapping_pixel_by_pixel(tmp_path):
    raw = make_ade20k(tmp_path / "ADEChallengeData2016")
    ds = _load("ade20k", tmp_path / "ADEChallengeData2016", tmp_path, split="validation")
    assert ds["id"] == sorted(raw)
    for example in ds:
        annotation = raw[example["id"]]
        expected = np.where(annotation == 0, 255, annotation.astype(int) - 1)
        np.testing.assert_array_equal(_mask_of(example), expected)
        assert example["image"].mode == "RGB" and example["image"].size == (64, 48)
        assert example["classes"] == sorted(set(np.unique(expected)) - {255})
    info = segmentation_info(ds)
    assert info.name == "ade20k" and info.class_names == ADE20K_CLASSES and info.num_classes == 150
    assert info.ignore_index == 255 and info.image_size is None
    assert ds.features["classes"].feature.int2str(149) == "flag"


def test_ade20k_native_images_stay_lazy_file_references(tmp_path):
    make_ade20k(tmp_path / "ade")
    ds = _load("ade20k", tmp_path / "ade", tmp_path, split="val", n=2)
    cells = ds.cast_column("image", ImageFeature(decode=False))["image"]
    assert all(cell["bytes"] is None and cell["path"].endswith(".jpg") for cell in cells)


def test_ade20k_n_takes_first_sorted_ids_and_train_split(tmp_path):
    raw = make_ade20k(tmp_path / "ade", split_folder="training", n=4)
    ds = _load("ade20k", tmp_path / "ade", tmp_path, split="train", n=2)
    assert ds["id"] == sorted(raw)[:2]
    assert ds.split == "train"


def test_resize_crop_and_squash_keep_labels_aligned(tmp_path):
    raw = make_ade20k(tmp_path / "ade", size=(48, 64), n=1)
    expected = np.where(raw[next(iter(raw))] == 0, 255, raw[next(iter(raw))].astype(int) - 1)
    crop = _load("ade20k", tmp_path / "ade", tmp_path, split="validation", image_size=24)[0]
    # Centre 48x48 square (columns 8..55) halved: one pixel per 2x2, inside 4x4 constant tiles.
    np.testing.assert_array_equal(_mask_of(crop), expected[:, 8:56][::2, ::2])
    assert crop["image"].size == (24, 24)
    squash_ds = _load("ade20k", tmp_path / "ade", tmp_path, split="validation", image_size=16,
                      resize="squash")  # fmt: skip
    # Nearest neighbour samples source pixel floor((i + 0.5) * scale): rows 1::3, columns 2::4.
    np.testing.assert_array_equal(_mask_of(squash_ds[0]), expected[1::3, 2::4])
    assert segmentation_info(squash_ds).image_size == 16


def test_ade20k_missing_folders_say_what_was_expected(tmp_path):
    root = tmp_path / "ade"
    with pytest.raises(FileNotFoundError, match=r"images/validation"):
        _load("ade20k", root, tmp_path, split="validation")
    (root / "images" / "validation").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"annotations/validation"):
        _load("ade20k", root, tmp_path, split="validation")
    (root / "annotations" / "validation").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"images/validation/\*\.jpg.*found 0"):
        _load("ade20k", root, tmp_path, split="validation")
    Image.new("RGB", (8, 8)).save(root / "images" / "validation" / "a.jpg")
    Image.new("L", (8, 8)).save(root / "annotations" / "validation" / "b.png")  # wrong stem
    with pytest.raises(
        FileNotFoundError,
        match=r"expected .*annotations/validation/\*\.png matching "
        r"images/validation/\*\.jpg; found 0",
    ):
        _load("ade20k", root, tmp_path, split="validation")


def test_ade20k_missing_mask_for_one_image_is_named(tmp_path):
    make_ade20k(tmp_path / "ade", n=3)
    (tmp_path / "ade" / "annotations" / "validation" / "ADE_val_00000002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"ADE_val_00000002\.png"):
        _load("ade20k", tmp_path / "ade", tmp_path, split="validation")
    # The first image alone is complete, so n=1 still loads.
    assert len(_load("ade20k", tmp_path / "ade", tmp_path, split="validation", n=1)) == 1


def test_ade20k_malformed_annotation_is_rejected_by_name(tmp_path):
    make_ade20k(tmp_path / "ade", n=2)
    bad = tmp_path / "ade" / "annotations" / "validation" / "ADE_val_00000001.png"
    Image.new("RGB", (64, 48), (10, 20, 30)).save(bad)
    with pytest.raises(ValueError, match=r"ADE_val_00000001\.png.*mode RGB"):
        _load("ade20k", tmp_path / "ade", tmp_path, split="validation")
    Image.new("L", (10, 10)).save(bad)  # right mode, wrong size
    with pytest.raises(ValueError, match=r"ADE_val_00000001\.png is 10x10 but its image .*64x48"):
        _load("ade20k", tmp_path / "ade", tmp_path, split="validation")
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"ADE_val_00000001\.png: not a readable image"):
        _load("ade20k", tmp_path / "ade", tmp_path, split="validation")


def test_cache_hit_on_reload_and_miss_after_an_edited_annotation(tmp_path):
    raw = make_ade20k(tmp_path / "ade", n=1)
    stem = next(iter(raw))
    first = _load("ade20k", tmp_path / "ade", tmp_path, split="validation")
    again = _load("ade20k", tmp_path / "ade", tmp_path, split="validation")
    assert again.cache_files == first.cache_files
    path = tmp_path / "ade" / "annotations" / "validation" / f"{stem}.png"
    Image.fromarray(np.full_like(raw[stem], 7), mode="L").save(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    edited = _load("ade20k", tmp_path / "ade", tmp_path, split="validation")
    assert (_mask_of(edited[0]) == 6).all()


# -------------------------------------------------------------------------------------- VOC


@pytest.mark.parametrize("path_level", ["root", "VOCdevkit", "VOC2012"])
def test_voc_palette_indices_are_the_labels(tmp_path, path_level):
    labels = make_voc(tmp_path)
    path = {"root": tmp_path, "VOCdevkit": tmp_path / "VOCdevkit",
            "VOC2012": tmp_path / "VOCdevkit" / "VOC2012"}[path_level]  # fmt: skip
    ds = _load("voc", path, tmp_path, split="val")
    assert ds["id"] == ["2007_000033", "2007_000042", "2008_000002"]
    for example in ds:
        np.testing.assert_array_equal(_mask_of(example), labels[example["id"]])
        assert example["image"].mode == "RGB"
    assert (_mask_of(ds[0])[0] == 255).all()  # the void border survives as ignore
    info = segmentation_info(ds)
    assert info.class_names == VOC_CLASSES and len(VOC_CLASSES) == 21 and info.name == "voc"
    assert ds.features["classes"].feature.names[15] == "person"


def test_voc_split_lists_and_n(tmp_path):
    make_voc(tmp_path)
    train = _load("voc", tmp_path, tmp_path, split="train")
    assert train["id"] == ["2007_000032", "2007_000039"]
    first = _load("voc", tmp_path, tmp_path, split="validation", n=1)
    assert first["id"] == ["2007_000033"]


def test_voc_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Segmentation"):
        _load("voc", tmp_path, tmp_path, split="val")
    labels = make_voc(tmp_path)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Segmentation/test\.txt"):
        _load("voc", tmp_path, tmp_path, split="test")
    (voc / "SegmentationClass" / "2007_000042.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"2007_000042\.png"):
        _load("voc", tmp_path, tmp_path, split="val")
    bad = labels["2007_000032"].copy()
    bad[5, 5] = 30
    Image.fromarray(bad, mode="L").save(voc / "SegmentationClass" / "2007_000032.png")
    with pytest.raises(ValueError, match=r"2007_000032\.png: VOC labels .* found \[30\]"):
        _load("voc", tmp_path, tmp_path, split="train")
    (voc / "JPEGImages" / "2007_000039.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"lists 2007_000039 but .*2007_000039\.jpg"):
        _load("voc", tmp_path, tmp_path, split="train")


# ------------------------------------------------------------------------------- Cityscapes


def test_cityscapes_label_ids_to_train_ids_pixel_by_pixel(tmp_path):
    raw = make_cityscapes(tmp_path)
    ds = _load("cityscapes", tmp_path, tmp_path, split="validation")
    assert ds["id"] == ["frankfurt/frankfurt_000000_000294", "frankfurt/frankfurt_000000_000576",
                        "lindau/lindau_000000_000019"]  # fmt: skip
    official = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
    assert LABEL_TO_TRAIN_ID == official
    for example in ds:
        label_ids = raw[example["id"]]
        expected = np.vectorize(lambda v: official.get(int(v), 255))(label_ids)
        np.testing.assert_array_equal(_mask_of(example), expected)
    info = segmentation_info(ds)
    assert info.class_names == CITYSCAPES_CLASSES and info.num_classes == 19
    assert CITYSCAPES_CLASSES[official[26]] == "car"


def test_cityscapes_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/val"):
        _load("cityscapes", tmp_path, tmp_path, split="val")
    make_cityscapes(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/train"):
        _load("cityscapes", tmp_path, tmp_path, split="train")
    (tmp_path / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"lindau_000000_000019_gtFine_labelIds\.png"):
        _load("cityscapes", tmp_path, tmp_path, split="val")
    with pytest.raises(ValueError, match=r"split must be one of"):
        _load("cityscapes", tmp_path, tmp_path, split="bogus")


# ------------------------------------------------------------------------------ dispatcher


def test_unknown_name_lists_supported_names():
    with pytest.raises(ValueError, match=r"supported: scenes, ade20k, scene_parse_150, voc, city"):
        load_segmentation("coco")


def test_real_datasets_keep_native_resolution_by_default(tmp_path):
    """A LLaVA user loading ADE20K must not get 64-px crops upsampled to 336 without a word."""
    make_ade20k(tmp_path / "ade", size=(48, 64))
    make_voc(tmp_path / "voc", size=(40, 56))
    ade = load_segmentation("ade20k", path=tmp_path / "ade", split="validation", cache_dir=str(tmp_path / "c1"))
    voc = load_segmentation("voc", path=tmp_path / "voc", split="train", cache_dir=str(tmp_path / "c2"))
    assert {ex["image"].size for ex in ade} == {(64, 48)} and segmentation_info(ade).image_size is None
    assert {ex["image"].size for ex in voc} == {(56, 40)}
    cropped = load_segmentation("ade20k", path=tmp_path / "ade", split="validation", image_size=32,
                                cache_dir=str(tmp_path / "c3"))
    assert {ex["image"].size for ex in cropped} == {(32, 32)}
    assert load_segmentation("scenes", split="validation", n=2)[0]["image"].size == (64, 64)


def test_real_dataset_without_path_is_an_error():
    with pytest.raises(ValueError, match=r"needs path="):
        load_segmentation("voc")


# -------------------------------------------------------------------------- scene_parse_150


def _fake_hub_split(n: int = 3) -> tuple[Dataset, list[np.ndarray]]:
    rng = np.random.default_rng(4)
    annotations = [_blocky(rng, 24, 32, [0, 1, 12, 150]) for _ in range(n)]
    features = Features({"image": ImageFeature(), "annotation": ImageFeature(),
                         "scene_category": ClassLabel(names=["bathroom", "bedroom"])})  # fmt: skip
    source = Dataset.from_dict(
        {
            # Grayscale on purpose: the loader must still produce RGB.
            "image": [Image.fromarray(_rgb(rng, 24, 32)).convert("L") for _ in range(n)],
            "annotation": [Image.fromarray(a, mode="L") for a in annotations],
            "scene_category": [0, 1, 0][:n],
        },
        features=features,
    )
    return source, annotations


def test_scene_parse_150_maps_hub_columns_like_the_folder_loader(tmp_path, monkeypatch):
    source, annotations = _fake_hub_split()
    calls = []

    def fake_load_dataset(repo, **kwargs):
        calls.append((repo, kwargs))
        return source.to_iterable_dataset() if kwargs["streaming"] else source

    monkeypatch.setattr(scene_parse_150, "load_dataset", fake_load_dataset)
    for name, n in (("ade20k", None), ("scene_parse_150", 2)):
        ds = load_segmentation(name, split="validation", n=n, image_size=None,
                               cache_dir=str(tmp_path / "cache"))  # fmt: skip
        assert len(ds) == (n or 3)
        for index, example in enumerate(ds):
            expected = np.where(annotations[index] == 0, 255, annotations[index].astype(int) - 1)
            np.testing.assert_array_equal(_mask_of(example), expected)
            assert example["image"].mode == "RGB"
            assert example["id"] == f"scene_parse_150/validation/{index:05d}"
        assert segmentation_info(ds).class_names == ADE20K_CLASSES
    assert calls[0][0] == "zhoubolei/scene_parse_150"
    assert calls[0][1]["revision"] == "refs/convert/parquet" and not calls[0][1]["streaming"]
    assert calls[1][1]["streaming"]  # n given: stream instead of downloading the whole split


def test_scene_parse_150_download_failure_suggests_path(tmp_path, monkeypatch):
    def unreachable(repo, **kwargs):
        raise ConnectionError("Couldn't reach 'zhoubolei/scene_parse_150' on the Hub")

    monkeypatch.setattr(scene_parse_150, "load_dataset", unreachable)
    with pytest.raises(HubUnavailableError, match=r"path=.*ADEChallengeData2016"):
        load_segmentation("ade20k", split="validation", n=2, cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------- unusable inputs, named up front


@pytest.mark.parametrize("image_size", [None, 24], ids=["native", "resized"])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_image_is_named_with_what_to_do(tmp_path, image_size, damage):
    from mmlens.errors import InputError

    make_ade20k(tmp_path / "ade", n=3, size=(96, 128))
    bad = tmp_path / "ade" / "images" / "validation" / "ADE_val_00000002.jpg"
    data = bad.read_bytes()
    bad.write_bytes(b"not a jpeg at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(InputError, match=r"ADE_val_00000002\.jpg: not a readable image .*Remove it and its annotation "
                                         r".*ADE_val_00000002\.png.*or replace it"):
        _load("ade20k", tmp_path / "ade", tmp_path, split="validation", image_size=image_size)


@pytest.mark.parametrize("n", [0, -1])
@pytest.mark.parametrize("name", ["scenes", "ade20k", "voc"])
def test_no_images_asked_for_is_refused(tmp_path, name, n):
    from mmlens.errors import InputError

    root = {"scenes": None, "ade20k": tmp_path / "ade", "voc": tmp_path}[name]
    if name == "ade20k":
        make_ade20k(root)
    elif name == "voc":
        make_voc(tmp_path)
    with pytest.raises(InputError, match=rf"n must be a positive number of images \(or None for all of them\), got {n}"):
        load_segmentation(name, path=root, split="validation" if name != "voc" else "val", n=n,
                          cache_dir=str(tmp_path / "cache"))


def test_loader_input_errors_are_mmlens_errors_so_the_cli_reports_them(tmp_path):
    from mmlens.data.scenes import load_scenes
    from mmlens.errors import InputError

    with pytest.raises(InputError, match="image_size must be at least 16 px"):
        load_segmentation("scenes", split="validation", n=2, image_size=8)
    with pytest.raises(InputError, match="start and seed must be non-negative"):
        load_scenes(split="validation", n=2, seed=-1)
    make_voc(tmp_path)
    with pytest.raises(InputError, match="VOC split must be one of"):
        load_segmentation("voc", path=tmp_path, split="vall", cache_dir=str(tmp_path / "cache"))
