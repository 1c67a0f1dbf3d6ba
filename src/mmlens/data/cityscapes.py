"""Cityscapes fine annotations from the official ``leftImg8bit``/``gtFine`` layout.

``*_gtFine_labelIds.png`` store the 34 raw label ids; the benchmark evaluates 19 of them, so a
256-entry lookup table maps each evaluated id to its train id (0..18) and everything else
(unlabelled, ego vehicle, rectification border, rare classes such as caravan) to ignore.
Examples are named ``{city}/{city}_{seq}_{frame}``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import Dataset

from ..errors import InputError
from .files import FilePair, load_file_pairs, read_label_png, require_dir, select_first
from .resize import ResizeMode
from .schema import IGNORE_INDEX, SegmentationInfo

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip

# labelId -> trainId for the 19 evaluated classes (cityscapesScripts labels.py).
LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

CITYSCAPES_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _label_id, _train_id in LABEL_TO_TRAIN_ID.items():
    CITYSCAPES_LUT[_label_id] = _train_id

SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test"}

_IMAGE_SUFFIX = "_leftImg8bit.png"
_MASK_SUFFIX = "_gtFine_labelIds.png"


def cityscapes_labels(label_ids: np.ndarray) -> np.ndarray:
    """Map raw Cityscapes labelIds to the 19 train ids, everything else to 255."""
    return CITYSCAPES_LUT[label_ids]


def read_cityscapes_mask(path: Path) -> np.ndarray:
    return cityscapes_labels(read_label_png(path, ("L",)))


def cityscapes_pairs(root: str | Path, split: str) -> list[FilePair]:
    if split not in SPLITS:
        raise InputError(f"Cityscapes split must be one of {sorted(SPLITS)}, got {split!r}")
    root, folder = Path(root), SPLITS[split]
    image_dir = require_dir(root / "leftImg8bit" / folder, f"Cityscapes leftImg8bit/{folder}/")
    mask_dir = require_dir(root / "gtFine" / folder, f"Cityscapes gtFine/{folder}/")
    images = sorted(image_dir.glob(f"*/*{_IMAGE_SUFFIX}"))
    if not images:
        raise FileNotFoundError(
            f"expected {image_dir}/{{city}}/*{_IMAGE_SUFFIX}; found 0 images"
        )
    pairs = []
    for image in images:
        city, stem = image.parent.name, image.name[: -len(_IMAGE_SUFFIX)]
        pairs.append(FilePair(f"{city}/{stem}", image, mask_dir / city / f"{stem}{_MASK_SUFFIX}"))
    if not any(pair.mask.is_file() for pair in pairs):
        raise FileNotFoundError(
            f"expected {mask_dir}/{{city}}/*{_MASK_SUFFIX} matching "
            f"leftImg8bit/{folder}/{{city}}/*{_IMAGE_SUFFIX}; found 0 of {len(pairs)} "
            f"(e.g. {pairs[0].mask})"
        )
    return pairs


def load_cityscapes(
    path: str | Path,
    *,
    split: str = "val",
    n: int | None = None,
    image_size: int | None = None,
    resize: ResizeMode = "crop",
    cache_dir: str | None = None,
    num_proc: int | None = None,
) -> Dataset:
    """Cityscapes from ``path`` (the folder holding ``leftImg8bit/`` and ``gtFine/``)."""
    pairs = select_first(cityscapes_pairs(path, split), n)
    info = SegmentationInfo("cityscapes", CITYSCAPES_CLASSES, IGNORE_INDEX, image_size)
    folder = SPLITS[split]
    return load_file_pairs(
        pairs,
        info=info,
        read_mask=read_cityscapes_mask,
        split="validation" if folder == "val" else folder,
        image_size=image_size,
        resize=resize,
        cache_dir=cache_dir,
        num_proc=num_proc,
    )
