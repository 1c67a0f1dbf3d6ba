"""Labelled batches: dataset rows -> model inputs, masks in the model's pixels, and token labels.

Every study that scores image tokens against a segmentation (the probe sweep, the knockout and
position studies, probe-based patching metrics) reads images the same way: decode a batch of
dataset rows once, preprocess the images with the model's processor, bring the masks into the
preprocessed image's pixels, and label every token of both grids (vision patches, LLM tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from ..data.schema import segmentation_info
from ..data.token_labels import TokenLabels, token_labels
from ..errors import LayoutMismatchError
from ..model import HookedMLLM, MultimodalInputs


@dataclass(frozen=True)
class LabelledBatch:
    """One batch of images with everything needed to score its tokens."""

    inputs: MultimodalInputs
    masks: Int[Tensor, "n_images height width"]  # in the preprocessed image's pixels
    labels: dict[str, TokenLabels]  # "vision" (patch grid) and "llm" (image-token grid)
    indices: np.ndarray  # dataset rows, in pixel_values order


def labelled_batches(
    model: HookedMLLM,
    dataset: Any,
    indices: Sequence[int] | np.ndarray,
    *,
    batch_size: int = 16,
    prompt: str = "",
    min_valid_fraction: float = 0.5,
    progress: bool = False,
    desc: str = "images",
) -> Iterator[LabelledBatch]:
    """Yield `LabelledBatch`es over `dataset[indices]` (an mmlens segmentation dataset)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    info = segmentation_info(dataset)
    n_classes, ignore = len(info.class_names), info.ignore_index
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) and (indices.min() < 0 or indices.max() >= len(dataset)):
        raise IndexError(f"dataset rows must be in 0..{len(dataset) - 1}; got {indices.min()}..{indices.max()}")
    steps = range(0, len(indices), batch_size)
    for start in tqdm(steps, desc=desc, disable=not progress, leave=False):
        chunk = indices[start : start + batch_size]
        rows = dataset[chunk.tolist()]  # decoded once
        _check_mask_sizes(model, rows, chunk)
        masks = torch.stack([
            torch.from_numpy(model.transform_mask(np.asarray(mask), ignore).astype(np.int64)) for mask in rows["mask"]
        ])
        inputs = model.prepare(rows["image"], prompt)
        layout = inputs.layout

        def label(grid):
            return token_labels(masks, grid, n_classes=n_classes, ignore_index=ignore,
                                min_valid_fraction=min_valid_fraction)

        labels = {"vision": label(layout.patch_grid)}
        # LLaVA's LLM grid is the patch grid: label it once then
        labels["llm"] = labels["vision"] if layout.token_grid == layout.patch_grid else label(layout.token_grid)
        yield LabelledBatch(inputs, masks, labels, chunk)


def _check_mask_sizes(model: HookedMLLM, rows: dict, chunk: np.ndarray) -> None:
    """Every mask must have its image's size: one of another size would be stretched onto it
    and label tokens with the wrong classes."""
    for index, image, mask in zip(chunk, rows["image"], rows["mask"]):
        image_hw = model.geometry.image_size(image)
        mask_hw = tuple(int(s) for s in np.asarray(mask).shape[:2])
        if image_hw != mask_hw:
            raise LayoutMismatchError(
                f"dataset row {int(index)}: the mask is (height, width) = {mask_hw} but its image is {image_hw}; "
                "a segmentation mask must have its image's size. Fix the dataset (resize the mask with "
                "nearest-neighbour resampling, or pair it with the image it was annotated on)"
            )
