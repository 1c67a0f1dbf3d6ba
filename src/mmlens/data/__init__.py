"""Segmentation datasets in one schema: ``id``, RGB ``image``, label ``mask`` (255 = ignore).

:func:`load_segmentation` dispatches by source name to one module per source (synthetic scenes,
ADE20K from folders or the hub, PASCAL VOC 2012, Cityscapes); each returns a ``datasets.Dataset``
whose class names and ignore index are read back with :func:`segmentation_info`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset

from ..errors import InputError
from .ade20k import ADE20K_CLASSES, SPLIT_FOLDERS as ADE20K_SPLITS, load_ade20k
from .build import check_count
from .resize import MIN_IMAGE_SIZE
from .cityscapes import CITYSCAPES_CLASSES, SPLITS as CITYSCAPES_SPLITS, load_cityscapes
from .scene_parse_150 import SPLITS as HUB_SPLITS, HubUnavailableError, load_scene_parse_150
from .scenes import SPLIT_STREAMS, load_scenes, lookalike_pairs, render_scene, scene_class_names
from .schema import IGNORE_INDEX, SegmentationInfo, segmentation_info
from .voc import SPLIT_FILES as VOC_SPLITS, VOC_CLASSES, load_voc

SUPPORTED = ("scenes", "ade20k", "scene_parse_150", "voc", "cityscapes")
SCENES_IMAGE_SIZE = 64  # what the embedded tiny-shapes models were trained on
# The split names each source accepts (aliases included), so a config can be checked before loading.
DATASET_SPLITS = {"scenes": (*SPLIT_STREAMS, "val"), "ade20k": tuple(ADE20K_SPLITS), "scene_parse_150": tuple(HUB_SPLITS),
                  "voc": tuple(VOC_SPLITS), "cityscapes": tuple(CITYSCAPES_SPLITS)}

__all__ = [
    "ADE20K_CLASSES",
    "CITYSCAPES_CLASSES",
    "DATASET_SPLITS",
    "IGNORE_INDEX",
    "MIN_IMAGE_SIZE",
    "SUPPORTED",
    "VOC_CLASSES",
    "HubUnavailableError",
    "SegmentationInfo",
    "load_segmentation",
    "lookalike_pairs",
    "render_scene",
    "scene_class_names",
    "segmentation_info",
]


def load_segmentation(
    name: str,
    *,
    path: str | Path | None = None,
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
    **kwargs: Any,
) -> Dataset:
    """Load segmentation source ``name`` in the common schema.

    ``n`` keeps the first n examples by id (scenes: the first n of the split's stream, 1000 if
    None). Real datasets keep their native resolution by default, images decoded lazily from
    their files, so the model's processor resizes them as it would any photo; an integer
    ``image_size`` makes every image a square of that side instead ("crop": centre square, the
    default, or ``resize="squash"``). The synthetic scenes are rendered at ``image_size`` pixels
    (64 when None, the embedded models' size). ``seed`` only affects the synthetic scenes. Extra
    keyword arguments go to the source loader (e.g. ``k`` for scenes, ``cache_dir``,
    ``num_proc``). "train" and "validation" (alias "val") work for every source; "test" for
    scenes, VOC (given its list file) and Cityscapes.
    """
    check_count(n)
    if image_size is not None and image_size < MIN_IMAGE_SIZE:
        raise InputError(f"image_size must be at least {MIN_IMAGE_SIZE} px (or None: native resolution), got {image_size}")
    key = name.lower()
    if key not in SUPPORTED:
        raise InputError(
            f"unknown segmentation dataset {name!r}; supported: {', '.join(SUPPORTED)}"
        )
    if key == "scenes":
        if path is not None:
            raise InputError("'scenes' is generated, it takes no path")
        return load_scenes(split=split, n=n, seed=seed, image_size=SCENES_IMAGE_SIZE if image_size is None else image_size,
                           **kwargs)
    if key == "scene_parse_150" or (key == "ade20k" and path is None):
        if path is not None:
            raise InputError("'scene_parse_150' reads the hub; use name='ade20k' with path=")
        return load_scene_parse_150(split=split, n=n, image_size=image_size, **kwargs)
    if path is None:
        raise InputError(f"{name!r} needs path= pointing at the dataset's root folder")
    loader = {"ade20k": load_ade20k, "voc": load_voc, "cityscapes": load_cityscapes}[key]
    return loader(path, split=split, n=n, image_size=image_size, **kwargs)
