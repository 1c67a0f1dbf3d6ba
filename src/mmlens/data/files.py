"""Shared machinery for datasets stored as (image file, annotation file) pairs on disk.

Each source module only lists its pairs and says how to turn one annotation file into our labels;
this module builds the dataset. At native resolution the image column stores file paths and
``datasets`` decodes an image only when it is read; masks are always decoded up front because
every source needs its labels remapped, and their classes are counted on the way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from datasets import Dataset
from PIL import Image

from ..errors import InputError
from .build import build_dataset, check_count, file_stats, fingerprint
from .resize import MIN_IMAGE_SIZE, RESIZE_MODES, ResizeMode, decoded_size, load_rgb, to_square
from .schema import SegmentationInfo, png_bytes, present_classes, segmentation_features

MaskReader = Callable[[Path], np.ndarray]


@dataclass(frozen=True)
class FilePair:
    id: str
    image: Path
    mask: Path


def select_first(pairs: list[FilePair], n: int | None) -> list[FilePair]:
    """The first ``n`` pairs by id, so a subset is the same whichever order files were listed."""
    check_count(n)
    pairs = sorted(pairs, key=lambda pair: pair.id)
    return pairs if n is None else pairs[:n]


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"expected {what} at {path}; no such directory")
    return path


def check_masks_exist(pairs: list[FilePair]) -> None:
    # Checked before generation so the error names every missing file, not just the first.
    missing = [pair for pair in pairs if not pair.mask.is_file()]
    if missing:
        shown = ", ".join(f"{pair.mask} (for {pair.image})" for pair in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(f"missing annotation for {len(missing)} image(s): {shown}{more}")


def load_file_pairs(
    pairs: list[FilePair],
    *,
    info: SegmentationInfo,
    read_mask: MaskReader,
    split: str,
    image_size: int | None,
    resize: ResizeMode = "crop",
    cache_dir: str | None = None,
    num_proc: int | None = None,
) -> Dataset:
    """Build a schema dataset from ``pairs`` (already validated, sorted and truncated)."""
    if resize not in RESIZE_MODES:
        raise InputError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if image_size is not None and image_size < MIN_IMAGE_SIZE:
        raise InputError(f"image_size must be at least {MIN_IMAGE_SIZE} px (or None: native resolution), got {image_size}")
    check_masks_exist(pairs)
    # Absolute paths: lazily decoded images must still resolve after a change of directory.
    rows = [(pair.id, str(pair.image.resolve()), str(pair.mask.resolve())) for pair in pairs]
    key = fingerprint(
        "files",
        info.name,
        split,
        image_size,
        resize,
        file_stats([path for _, image, mask in rows for path in (image, mask)]),
    )
    return build_dataset(
        _generate,
        gen_kwargs={
            "rows": rows,
            "read_mask": read_mask,
            "num_classes": info.num_classes,
            "image_size": image_size,
            "resize": resize,
        },
        features=segmentation_features(info.class_names),
        info=info,
        fingerprint=key,
        split=split,
        cache_dir=cache_dir,
        num_proc=num_proc if num_proc and num_proc > 1 and len(rows) > 1 else None,
    )


def _generate(rows, read_mask, num_classes, image_size, resize):
    for sample_id, image_path, mask_path in rows:
        mask = read_mask(Path(mask_path))
        try:
            image, mask = _image_and_mask(image_path, mask_path, mask, image_size, resize)
        except OSError as error:  # PIL's UnidentifiedImageError, "image file is truncated", unreadable files
            raise InputError(f"{image_path}: not a readable image ({error}). Remove it and its annotation {mask_path} "
                             "from the dataset folder, or replace it with an intact copy, then load again") from None
        yield {
            "id": sample_id,
            "image": image,
            "mask": png_bytes(mask),
            "classes": present_classes(mask, num_classes),
        }


def _image_and_mask(image_path: str, mask_path: str, mask: np.ndarray, image_size, resize) -> tuple[dict, np.ndarray]:
    """The image column's value and the mask, resized to `image_size` when given; `OSError` when
    the image file cannot be decoded."""
    if image_size is None:
        width, height = decoded_size(image_path)
        if (width, height) != (mask.shape[1], mask.shape[0]):
            raise InputError(
                f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{image_path} is {width}x{height}"
            )
        return {"path": image_path, "bytes": None}, mask
    rgb = load_rgb(image_path)
    if rgb.size != (mask.shape[1], mask.shape[0]):
        raise InputError(
            f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
            f"{image_path} is {rgb.size[0]}x{rgb.size[1]}"
        )
    pixels, mask = to_square(rgb, mask, image_size, resize)
    return png_bytes(pixels), mask


def read_label_png(path: Path, modes: tuple[str, ...]) -> np.ndarray:
    """Decode an annotation PNG whose pixel values are labels, rejecting colour-coded files."""
    try:
        with Image.open(path) as image:
            if image.mode not in modes:
                raise InputError(
                    f"{path}: expected a label PNG of mode {' or '.join(modes)} (pixel value = "
                    f"label), got mode {image.mode}; colour-coded annotations are not label maps"
                )
            # np.asarray on a "P" image gives palette indices, which is what VOC labels are.
            return np.asarray(image, dtype=np.uint8).copy()
    except OSError as error:  # PIL.UnidentifiedImageError included
        raise InputError(f"{path}: not a readable image ({error})") from error
