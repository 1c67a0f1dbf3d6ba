"""Labels for image tokens from pixel masks: each token takes the classes of its pixel box.

A token's box comes from the layout's `PixelMap` (`layout.pixels(stage)`), so the same function
serves vision patches and LLM tokens, one grid for all images or each image's own segments. The
hard label is the majority class among the box's valid pixels; a token whose valid fraction is
below `min_valid_fraction` is marked invalid. The class fractions are kept as soft labels. It lives in probing, the first layer that has both the data
(masks) and the model (the layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..data.schema import IGNORE_INDEX
from ..model.images.layout import ImageTokenLayout
from ..model.images.pixel_map import PixelMap


@dataclass(frozen=True)
class TokenLabels:
    """Per image and token: majority class, whether it counts, and class fractions."""

    labels: Int[Tensor, "n_images n_tokens"]  # majority class; `ignore_index` where invalid
    valid: Bool[Tensor, "n_images n_tokens"]
    fractions: Float[Tensor, "n_images n_tokens n_classes"]  # of the box's valid pixels
    valid_fraction: Float[Tensor, "n_images n_tokens"]  # valid pixels / box pixels
    ignore_index: int


def token_labels(
    masks: Int[Tensor, "n_images height width"] | np.ndarray,
    layout: ImageTokenLayout | PixelMap,
    *,
    n_classes: int,
    stage: Literal["llm", "vision"] = "llm",
    ignore_index: int = IGNORE_INDEX,
    min_valid_fraction: float = 0.5,
) -> TokenLabels:
    """Token labels for masks already in the canvas pixels (see `HookedMLLM.transform_mask`).
    `stage` picks the LLM tokens or the vision patches when a layout is given. For a layout whose
    images have their own segments (tiles, variable grids), masks are [n_images, H, W] padded with
    `ignore_index` to the largest canvas, and the labels come out in `layout.gather` rows (absent
    rows invalid)."""
    masks = torch.as_tensor(np.asarray(masks) if not isinstance(masks, Tensor) else masks).long()
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"masks must be [n, height, width] or [height, width], got {tuple(masks.shape)}")
    pixels = layout.pixels(stage) if isinstance(layout, ImageTokenLayout) else layout
    cell, box_pixels, layers = pixels.box_pixels(masks)
    n_tokens = box_pixels.shape[-1]
    cell, flat = cell.expand(masks.shape[0], -1), masks.flatten(1).repeat(1, layers)  # once per segment
    _check_classes(masks, n_classes, ignore_index)
    n_images = masks.shape[0]
    valid_pixels = (flat != ignore_index) & (cell >= 0)
    index = cell.clamp(min=0) * n_classes + flat.clamp(0, n_classes - 1)
    counts = torch.zeros(n_images, n_tokens * n_classes)
    if n_tokens:  # images without grid tokens (learned queries) have no token to label
        counts.scatter_add_(1, index, valid_pixels.float())
    counts = counts.view(n_images, n_tokens, n_classes)
    n_valid = counts.sum(-1)
    valid_fraction = n_valid / box_pixels.clamp(min=1)  # an absent row has no pixels
    fractions = counts / n_valid.clamp(min=1).unsqueeze(-1)
    valid = (valid_fraction >= min_valid_fraction) & (n_valid > 0)
    labels = torch.where(valid, counts.argmax(-1), torch.full_like(valid, ignore_index, dtype=torch.long))
    return TokenLabels(labels, valid, fractions, valid_fraction, ignore_index)


def _check_classes(masks: Tensor, n_classes: int, ignore_index: int) -> None:
    valid_pixels = masks != ignore_index
    out_of_range = valid_pixels & ((masks < 0) | (masks >= n_classes))
    if out_of_range.any():
        bad = masks[out_of_range].unique()[:10].tolist()
        raise ValueError(
            f"mask labels {bad} are outside 0..{n_classes - 1} and not the ignore index "
            f"{ignore_index}; check n_classes or the dataset's label mapping"
        )
