"""Labelled batches: dataset rows -> model inputs, masks in the model's pixels, and token labels.

Every study that scores image tokens against a segmentation (the probe sweep, the knockout and
position studies, probe-based patching metrics) reads images the same way: decode a batch of
dataset rows once, preprocess the images with the model's processor, bring the masks into the
preprocessed image's pixels, and label every token of both grids (vision patches, LLM tokens).
On request each token also gets a visual type (its box's majority colour, quantised), the input
that the control task's random labels are a function of.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor
from ..progress import progress_bar

from .. import distributed
from ..data.schema import segmentation_info
from ..errors import LayoutMismatchError
from ..model import HookedMLLM, MultimodalInputs
from ..model.images.vision_grids import VisionGrid
from .token_labels import TokenLabels, token_labels


@dataclass(frozen=True)
class LabelledBatch:
    """One batch of images with everything needed to score its tokens."""

    inputs: MultimodalInputs
    masks: Int[Tensor, "n_images height width"]  # in the layout's canvas pixels, padded with ignore to the largest
    # "vision" (patch grid), "llm" (image-token grid) and each of the layout's `vision_grids` (a second tower's patches)
    labels: dict[str, TokenLabels]
    indices: np.ndarray  # dataset rows, in pixel_values order
    # with `visual_types`: per pixel (as `masks`) and per token of each grid, the token's visual type
    # (its box's majority quantised colour), the input a control task assigns random labels to
    type_masks: Int[Tensor, "n_images height width"] | None = None
    types: dict[str, Int[Tensor, "n_images n_tokens"]] | None = None


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
    visual_types: bool = False,
    vision_grids: Collection[str] | None = None,
) -> Iterator[LabelledBatch]:
    """Yield `LabelledBatch`es over `dataset[indices]` (an mmlens segmentation dataset); with
    `visual_types`, also each pixel's and token's visual type (`VISUAL_LEVELS` colour levels per
    channel, brought into the model's pixels like a mask). `vision_grids`: the prefixes of the layout's
    other vision grids to label besides "vision" and "llm" (None: all of them); a finer stage's grid
    holds many labels per token (FastVLM's first at 1024 px: 256x256 cells), so a sweep names only
    those its sites read."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    info = segmentation_info(dataset)
    n_classes, ignore = len(info.class_names), info.ignore_index
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) and (indices.min() < 0 or indices.max() >= len(dataset)):
        raise IndexError(f"dataset rows must be in 0..{len(dataset) - 1}; got {indices.min()}..{indices.max()}")
    # the bar counts images (not batches): its rate and total mean the same at any batch size
    bar = progress_bar(total=len(indices), desc=desc, unit="image", enabled=progress)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        rows = dataset[chunk.tolist()]  # decoded once
        _check_mask_sizes(model, rows, chunk)
        masks = pad_stack([
            torch.from_numpy(model.transform_mask(np.asarray(mask), ignore).astype(np.int64)) for mask in rows["mask"]
        ], ignore)
        inputs = model.prepare(rows["image"], prompt)
        layout = inputs.layout

        def label(pixels):
            return token_labels(masks, pixels, n_classes=n_classes, ignore_index=ignore,
                                min_valid_fraction=min_valid_fraction)

        vision, llm = layout.pixels("vision"), layout.pixels("llm")
        labels = {"vision": label(vision)}
        # LLaVA's LLM tokens are its patches: label them once then
        labels["llm"] = labels["vision"] if llm == vision else label(llm)
        # a second tower's patches, labelled on the canvas that tower read (masks carried there alike; a
        # finer stage of the one tower read the layout's canvas, so its masks are these)
        other_grids = {name: grid for name, grid in layout.vision_grids.items()
                       if vision_grids is None or name in vision_grids}
        tower_masks = {name: masks if grid.canvas is None else on_canvas(model, grid, rows["mask"], ignore)
                       for name, grid in other_grids.items()}
        for name, grid in other_grids.items():
            labels[name] = token_labels(tower_masks[name], grid.label_pixels, n_classes=n_classes, ignore_index=ignore,
                                        min_valid_fraction=min_valid_fraction)
        type_masks = types = None
        if visual_types:
            type_masks = pad_stack([torch.from_numpy(model.transform_mask(colour_types(image), TYPE_IGNORE).astype(np.int64))
                                    for image in rows["image"]], TYPE_IGNORE)

            def majority_type(pixels):
                return token_labels(type_masks, pixels, n_classes=N_VISUAL_TYPES, ignore_index=TYPE_IGNORE,
                                    min_valid_fraction=0.0).labels

            types = {"vision": majority_type(vision), "llm": majority_type(llm)}
            for name, grid in other_grids.items():
                on_tower = type_masks if grid.canvas is None else on_canvas(
                    model, grid, [colour_types(image) for image in rows["image"]], TYPE_IGNORE)
                types[name] = token_labels(on_tower, grid.label_pixels, n_classes=N_VISUAL_TYPES, ignore_index=TYPE_IGNORE,
                                           min_valid_fraction=0.0).labels
        yield LabelledBatch(inputs, masks, labels, chunk, type_masks, types)
        bar.update(len(chunk))  # after the consumer's forward pass: the bar moves when the work is done
    bar.close()


def on_canvas(model: HookedMLLM, grid: VisionGrid, masks: Sequence[Any], ignore: int) -> Int[Tensor, "n height width"]:
    """Masks (in original image pixels) carried onto the canvas a second tower's grid is labelled on."""
    geometry = getattr(model.geometry, grid.canvas)
    return pad_stack([torch.from_numpy(geometry.transform_mask(np.asarray(mask), ignore).astype(np.int64))
                      for mask in masks], ignore)


VISUAL_LEVELS = 4  # per colour channel: 64 visual types
N_VISUAL_TYPES = VISUAL_LEVELS**3
TYPE_IGNORE = 255


def colour_types(image) -> np.ndarray:
    """Each pixel's visual type: its RGB colour quantised to `VISUAL_LEVELS` levels per channel."""
    rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.int64)[..., :3]
    level = rgb * VISUAL_LEVELS // 256
    return (level[..., 0] * VISUAL_LEVELS + level[..., 1]) * VISUAL_LEVELS + level[..., 2]


def rank_batches(
    model: HookedMLLM,
    dataset: Any,
    indices: Sequence[int] | np.ndarray,
    *,
    batch_size: int = 16,
    group: Any = None,
    **settings: Any,
) -> Iterator[tuple[int, LabelledBatch]]:
    """This rank's `LabelledBatch`es over `dataset[indices]`, each with its number b in the
    single-process order (every batch of them in one process). Batch b goes to rank b mod world
    size whole, with the very images one process would put in it, so a per-image result is the
    same computation on any number of ranks; `distributed.gather_in_order` on (b, result) gives
    the single-process list. Other keywords go to `labelled_batches`."""
    indices = np.asarray(indices, dtype=np.int64)
    starts = distributed.batch_starts(len(indices), batch_size, group)
    # every batch but the last of all is full, and that one is its rank's last: cutting the
    # concatenation into batch_size pieces gives back exactly these batches
    mine = np.concatenate([indices[start : start + batch_size] for start in starts]) if starts else indices[:0]
    numbers = iter([start // batch_size for start in starts])
    for batch in labelled_batches(model, dataset, mine, batch_size=batch_size, **settings):
        yield next(numbers), batch


def pad_stack(items: list[Tensor], fill: int) -> Tensor:
    """Stack tensors of one ndim, padding each at the end of every dim with `fill` to the largest:
    masks in original pixels (tiled families) and per-image token rows differ in size; items of one
    size are stacked unchanged."""
    if not items:
        return torch.zeros(0, dtype=torch.long)
    shape = [max(t.shape[d] for t in items) for d in range(items[0].ndim)]
    out = torch.full((len(items), *shape), fill, dtype=items[0].dtype)
    for k, item in enumerate(items):
        out[(k, *(slice(0, n) for n in item.shape))] = item
    return out


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
