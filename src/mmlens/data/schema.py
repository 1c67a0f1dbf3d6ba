"""The common segmentation schema every loader produces, and where its metadata lives.

Every dataset has the columns ``id`` (string), ``image`` (RGB ``Image()``), ``mask`` (``Image()``
holding a mode "L" PNG: class index per pixel, 255 = ignore) and ``classes`` (the sorted class ids
present in the mask). ``classes`` is a ``List(ClassLabel(names=...))``, so the class names travel in
the features themselves, which ``datasets`` keeps through select, splits, map, filter,
save_to_disk, Parquet and the hub; the rest of :class:`SegmentationInfo` (source name, ignore
index, image size) is a JSON document in ``info.description``, which survives every in-library
operation but not a Parquet round trip, so :func:`segmentation_info` falls back to defaults there.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value
from PIL import Image as PILImage

IGNORE_INDEX = 255
# Namespaced so a description written by someone else is never mistaken for ours.
_INFO_KEY = "mmlens.segmentation"


@dataclass(frozen=True)
class SegmentationInfo:
    """What a consumer needs to interpret the masks of a segmentation dataset."""

    name: str
    class_names: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX
    image_size: int | None = None  # side of the square images, None when sizes vary

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if len(self.class_names) > self.ignore_index:
            raise ValueError(
                f"{len(self.class_names)} classes collide with ignore index {self.ignore_index}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def segmentation_features(
    class_names: tuple[str, ...] | list[str], extra: Mapping[str, Any] | None = None
) -> Features:
    """Features of the common schema, plus optional source-specific columns."""
    features = {
        "id": Value("string"),
        # mode="RGB" makes decoding convert grayscale/CMYK source files (ADE20K has some).
        "image": Image(mode="RGB"),
        "mask": Image(),
        "classes": List(ClassLabel(names=list(class_names))),
    }
    features.update(extra or {})
    return Features(features)


def attach_info(dataset: Dataset, info: SegmentationInfo) -> Dataset:
    """Record ``info`` on ``dataset`` (in place, returned for chaining)."""
    names = dataset.features["classes"].feature.names
    if tuple(names) != info.class_names:
        raise ValueError("the 'classes' feature and the SegmentationInfo disagree on class names")
    payload = asdict(info)
    payload["class_names"] = list(info.class_names)
    dataset.info.description = json.dumps({_INFO_KEY: payload})
    dataset.info.dataset_name = info.name
    return dataset


def segmentation_info(dataset: Dataset | DatasetDict) -> SegmentationInfo:
    """Read back the :class:`SegmentationInfo` of a dataset built by :mod:`mmlens.data`."""
    if isinstance(dataset, DatasetDict):
        infos = {segmentation_info(split) for split in dataset.values()}
        if len(infos) != 1:
            raise ValueError(f"splits disagree on their segmentation info: {infos}")
        return infos.pop()
    feature = dataset.features.get("classes")
    if not (isinstance(feature, List) and isinstance(feature.feature, ClassLabel)):
        raise ValueError(
            "not an mmlens segmentation dataset: expected a 'classes' column of type "
            f"List(ClassLabel(...)), found {feature!r}"
        )
    class_names = tuple(feature.feature.names)
    stored = _stored_payload(dataset.info.description)
    if stored is None:
        # Parquet and hub round trips keep the features but drop the description.
        return SegmentationInfo(
            name=dataset.info.dataset_name or "unknown", class_names=class_names
        )
    return SegmentationInfo(
        name=stored["name"],
        class_names=class_names,
        ignore_index=int(stored.get("ignore_index", IGNORE_INDEX)),
        image_size=stored.get("image_size"),
    )


def _stored_payload(description: str | None) -> dict | None:
    if not description:
        return None
    try:
        document = json.loads(description)
    except json.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    return document.get(_INFO_KEY)


def present_classes(mask: np.ndarray, num_classes: int) -> list[int]:
    """Sorted class ids occurring in ``mask``; ignore (and any out-of-range value) excluded."""
    counts = np.bincount(mask.ravel(), minlength=256)[:num_classes]
    return np.flatnonzero(counts).tolist()


def png_bytes(array: np.ndarray) -> dict:
    """Encode a uint8 HxW or HxWx3 array as an ``Image()`` cell of PNG bytes."""
    buffer = io.BytesIO()
    # Level 1 is ~5x faster than the default and only slightly larger on noisy images.
    PILImage.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}
