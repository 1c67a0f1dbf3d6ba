"""ADE20K SceneParsing from the Hugging Face hub dataset ``scene_parse_150``.

The hub copy has columns ``image``, ``annotation`` (the same L-mode label PNGs as the release)
and ``scene_category``; we convert ``annotation`` with the ADE20K lookup table, so both sources
give identical labels. The original repository is a loading script, which ``datasets`` >= 4
refuses to run, so by default we read its Parquet export (``refs/convert/parquet``).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from datasets import Dataset, load_dataset
from PIL import Image

from ..errors import HubUnavailableError, InputError
from .ade20k import ADE20K_CLASSES, ade20k_labels
from .build import build_dataset, check_count, fingerprint
from .resize import RESIZE_MODES, ResizeMode, to_square
from .schema import (
    IGNORE_INDEX,
    SegmentationInfo,
    png_bytes,
    present_classes,
    segmentation_features,
)

HUB_REPO = "zhoubolei/scene_parse_150"
HUB_REVISION = "refs/convert/parquet"
HUB_DATA_DIR = "scene_parsing"  # the export also holds an "instance_segmentation" config
SPLITS = {"train": "train", "training": "train", "validation": "validation",
          "val": "validation"}  # fmt: skip


def _hub_error(repo: str, error: BaseException) -> HubUnavailableError:
    return HubUnavailableError(
        f"could not load {repo!r} from the Hugging Face hub ({type(error).__name__}: {error}). "
        "Download ADEChallengeData2016 (http://sceneparsing.csail.mit.edu) and pass "
        "load_segmentation('ade20k', path='/path/to/ADEChallengeData2016') instead."
    )


def load_scene_parse_150(
    *,
    split: str = "validation",
    n: int | None = None,
    image_size: int | None = None,
    resize: ResizeMode = "crop",
    cache_dir: str | None = None,
    repo: str = HUB_REPO,
    revision: str | None = HUB_REVISION,
    data_dir: str | None = HUB_DATA_DIR,
    streaming: bool | None = None,
    **load_kwargs: Any,
) -> Dataset:
    """ADE20K via ``datasets.load_dataset``; with ``n`` set, streams only the first ``n`` rows."""
    if split not in SPLITS:
        raise InputError(f"scene_parse_150 split must be one of {sorted(SPLITS)}, got {split!r}")
    if resize not in RESIZE_MODES:
        raise InputError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    check_count(n)
    hub_split = SPLITS[split]
    # Streaming avoids downloading ~1 GB of Parquet when only a few examples are wanted.
    streaming = n is not None if streaming is None else streaming
    try:
        source = load_dataset(
            repo,
            split=hub_split,
            revision=revision,
            data_dir=data_dir,
            streaming=streaming,
            cache_dir=cache_dir,
            **load_kwargs,
        )
    except Exception as error:  # network, auth, missing repo, script refusal: all mean "no hub"
        raise _hub_error(repo, error) from error
    missing = {"image", "annotation"} - set(source.column_names or ())
    if source.column_names is not None and missing:
        raise InputError(
            f"{repo!r} has columns {source.column_names}; expected 'image', 'annotation' "
            "(and 'scene_category') as in scene_parse_150"
        )
    if n is not None:
        source = source.take(n) if streaming else source.select(range(min(n, len(source))))
    info = SegmentationInfo("ade20k", ADE20K_CLASSES, IGNORE_INDEX, image_size)
    key = fingerprint("scene_parse_150", repo, revision, data_dir, hub_split, n, image_size,
                      resize, getattr(source, "_fingerprint", None))  # fmt: skip
    try:
        return build_dataset(
            _generate,
            gen_kwargs={"source": source, "repo": repo, "split": hub_split,
                        "image_size": image_size, "resize": resize},  # fmt: skip
            features=segmentation_features(info.class_names),
            info=info,
            fingerprint=key,
            split=hub_split,
            cache_dir=cache_dir,
        )
    except (ConnectionError, TimeoutError) as error:
        # A streamed source only touches the network while being iterated.
        raise _hub_error(repo, error) from error


def convert_example(
    example: dict, image_size: int | None, resize: ResizeMode
) -> tuple[Image.Image | np.ndarray, np.ndarray]:
    """(RGB image, label mask) of one hub row, labels remapped exactly as for local ADE20K."""
    image = example["image"].convert("RGB")
    annotation = example["annotation"]
    if annotation.mode not in ("L", "P"):
        raise InputError(f"expected an L-mode annotation, got mode {annotation.mode}")
    mask = ade20k_labels(np.asarray(annotation, dtype=np.uint8))
    if image_size is None:
        if image.size != annotation.size:
            raise InputError(f"image is {image.size} but annotation is {annotation.size}")
        return image, mask
    return to_square(image, mask, image_size, resize)


def _generate(source: Iterable[dict], repo: str, split: str, image_size, resize):
    for index, example in enumerate(source):
        image, mask = convert_example(example, image_size, resize)
        pixels = np.asarray(image, dtype=np.uint8)
        yield {
            # The hub rows carry no file names; the row index in the split is stable.
            "id": f"scene_parse_150/{split}/{index:05d}",
            "image": png_bytes(pixels),
            "mask": png_bytes(mask),
            "classes": present_classes(mask, len(ADE20K_CLASSES)),
        }
