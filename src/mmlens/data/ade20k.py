"""ADE20K SceneParsing (150 classes) from the official ``ADEChallengeData2016`` folder layout.

Annotation PNGs store 0 for "other" (unlabelled) and 1..150 for the classes; we shift by one so
classes are 0..149 and map 0 to the ignore index, the "reduce zero label" convention every
ADE20K benchmark uses. Pairs are matched by file stem: ``images/{split}/X.jpg`` with
``annotations/{split}/X.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import Dataset

from ..errors import InputError
from .files import FilePair, load_file_pairs, read_label_png, require_dir, select_first
from .resize import ResizeMode
from .schema import IGNORE_INDEX, SegmentationInfo

# objectInfo150 order (first name of each synonym list), as used by mmsegmentation.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

# Our split names -> the folder names of the release.
SPLIT_FOLDERS = {"train": "training", "training": "training", "validation": "validation",
                 "val": "validation"}  # fmt: skip

# 0 ("other") -> ignore, k -> k - 1; values above 150 are not ADE20K labels and become ignore.
ADE20K_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
ADE20K_LUT[1 : len(ADE20K_CLASSES) + 1] = np.arange(len(ADE20K_CLASSES), dtype=np.uint8)


def ade20k_labels(annotation: np.ndarray) -> np.ndarray:
    """Map raw ADE20K annotation values (0 = other, 1..150) to our labels (0..149, 255)."""
    return ADE20K_LUT[annotation]


def read_ade20k_mask(path: Path) -> np.ndarray:
    return ade20k_labels(read_label_png(path, ("L",)))


def ade20k_pairs(root: str | Path, split: str) -> list[FilePair]:
    """Every (image, annotation) pair of a split, or an error saying what was expected."""
    if split not in SPLIT_FOLDERS:
        raise InputError(f"ADE20K split must be one of {sorted(SPLIT_FOLDERS)}, got {split!r}")
    root = Path(root)
    folder = SPLIT_FOLDERS[split]
    image_dir = require_dir(root / "images" / folder, f"ADE20K images/{folder}/*.jpg")
    annotation_dir = require_dir(
        root / "annotations" / folder, f"ADE20K annotations/{folder}/*.png"
    )
    images = sorted(image_dir.glob("*.jpg"))
    if not images:
        raise FileNotFoundError(
            f"expected {image_dir}/*.jpg (ADE20K images/{folder}); found 0 JPEG files"
        )
    pairs = [FilePair(path.stem, path, annotation_dir / f"{path.stem}.png") for path in images]
    matched = sum(pair.mask.is_file() for pair in pairs)
    if matched == 0:
        raise FileNotFoundError(
            f"expected {annotation_dir}/*.png matching images/{folder}/*.jpg; found 0 of "
            f"{len(pairs)} (e.g. {pairs[0].mask.name} for {pairs[0].image.name})"
        )
    return pairs


def load_ade20k(
    path: str | Path,
    *,
    split: str = "validation",
    n: int | None = None,
    image_size: int | None = None,
    resize: ResizeMode = "crop",
    cache_dir: str | None = None,
    num_proc: int | None = None,
) -> Dataset:
    """ADE20K from ``path`` (the folder holding ``images/`` and ``annotations/``)."""
    pairs = select_first(ade20k_pairs(path, split), n)
    info = SegmentationInfo("ade20k", ADE20K_CLASSES, IGNORE_INDEX, image_size)
    return load_file_pairs(
        pairs,
        info=info,
        read_mask=read_ade20k_mask,
        split="train" if SPLIT_FOLDERS[split] == "training" else "validation",
        image_size=image_size,
        resize=resize,
        cache_dir=cache_dir,
        num_proc=num_proc,
    )
