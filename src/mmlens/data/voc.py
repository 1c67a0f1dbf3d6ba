"""PASCAL VOC 2012 semantic segmentation from the official ``VOCdevkit/VOC2012`` layout.

``SegmentationClass/*.png`` are palette PNGs whose palette *indices* are the labels (0 =
background, 1..20 the classes, 255 = the "void" border around objects), so we read the indices
and never the colours. The split lists ids in ``ImageSets/Segmentation/{split}.txt``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import Dataset

from ..errors import InputError
from .files import FilePair, load_file_pairs, read_label_png, select_first
from .resize import ResizeMode
from .schema import IGNORE_INDEX, SegmentationInfo

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

SPLIT_FILES = {"train": "train", "val": "val", "validation": "val", "trainval": "trainval",
               "test": "test"}  # fmt: skip

_LABEL_DIRS = ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")


def voc_palette() -> np.ndarray:
    """The 256x3 uint8 VOC colour map (bit-interleaved label bits), as in the devkit."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for label in range(256):
        value, red, green, blue = label, 0, 0, 0
        for shift in range(7, -1, -1):
            red |= (value & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[label] = (red, green, blue)
    return palette


def read_voc_mask(path: Path) -> np.ndarray:
    # "L" too: SegmentationClassAug and re-saved masks store the same indices without a palette.
    labels = read_label_png(path, ("P", "L"))
    bad = np.setdiff1d(np.unique(labels), np.r_[np.arange(len(VOC_CLASSES)), IGNORE_INDEX])
    if bad.size:
        raise InputError(
            f"{path}: VOC labels must be 0..{len(VOC_CLASSES) - 1} or {IGNORE_INDEX}, "
            f"found {bad.tolist()}"
        )
    return labels


def voc_root(path: str | Path) -> Path:
    """The ``VOC2012`` folder, also accepted through ``VOCdevkit`` or the folder above it."""
    path = Path(path)
    for candidate in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"):
        if all((candidate / sub).is_dir() for sub in _LABEL_DIRS):
            return candidate
    missing = [sub for sub in _LABEL_DIRS if not (path / sub).is_dir()]
    raise FileNotFoundError(
        f"expected a VOC2012 folder at {path} with {', '.join(_LABEL_DIRS)}; missing: "
        f"{', '.join(missing)}"
    )


def voc_pairs(path: str | Path, split: str, n: int | None = None) -> list[FilePair]:
    """The first ``n`` (all if None) listed pairs of a split, sorted by id."""
    if split not in SPLIT_FILES:
        raise InputError(f"VOC split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    root = voc_root(path)
    list_file = root / "ImageSets" / "Segmentation" / f"{SPLIT_FILES[split]}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"expected the split list {list_file}; no such file")
    ids = sorted({line.split()[0] for line in list_file.read_text().splitlines() if line.strip()})
    if not ids:
        raise InputError(f"{list_file} lists no image ids")
    pairs = []
    # Only the selected ids must exist: a partial download still serves its first n images.
    for image_id in ids if n is None else ids[: max(n, 0)]:
        image = root / "JPEGImages" / f"{image_id}.jpg"
        if not image.is_file():
            raise FileNotFoundError(f"{list_file} lists {image_id} but {image} does not exist")
        pairs.append(FilePair(image_id, image, root / "SegmentationClass" / f"{image_id}.png"))
    return pairs


def load_voc(
    path: str | Path,
    *,
    split: str = "val",
    n: int | None = None,
    image_size: int | None = None,
    resize: ResizeMode = "crop",
    cache_dir: str | None = None,
    num_proc: int | None = None,
) -> Dataset:
    """PASCAL VOC 2012 from ``path`` (``VOC2012``, ``VOCdevkit`` or the folder above it)."""
    root = voc_root(path)
    list_name = SPLIT_FILES.get(split, split)
    pairs = select_first(voc_pairs(root, split, n), n)
    info = SegmentationInfo("voc", VOC_CLASSES, IGNORE_INDEX, image_size)
    return load_file_pairs(
        pairs,
        info=info,
        read_mask=read_voc_mask,
        split="validation" if list_name == "val" else list_name,
        image_size=image_size,
        resize=resize,
        cache_dir=cache_dir,
        num_proc=num_proc,
    )
