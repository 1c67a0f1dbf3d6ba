"""Segmentation metrics at the pixel level, so stages with different token grids compare.

A token's predicted class fills the pixels it paints (through the layout's `PixelMap`); pixels
labelled ignore are left out. Per image the true positives, false positives and false negatives of every
class are kept, so mIoU intervals come from a bootstrap over images and totals add up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from ..model.images.pixel_map import PixelMap, as_pixel_map
from ..resampling import bootstrap_indices, resample_counts  # noqa: F401  (bootstrap_indices re-exported: the studies import it from here)


def tokens_to_pixels(
    predictions: Int[Tensor, "n_images n_tokens"], grid: PixelMap | Int[Tensor, "n_images h w"]
) -> Int[Tensor, "n_images h w"]:
    """Paint every token's prediction over its pixels: `grid` is the layout's `PixelMap`
    (`ImageTokenLayout.pixels(stage)`) or per image the token painting each pixel
    (`ImageTokenLayout.pixel_map`); -1 where no token paints."""
    return as_pixel_map(grid).paint(predictions)


@dataclass
class SegmentationScores:
    """Per-image TP/FP/FN per class, a confusion matrix, and token-level counts."""

    n_classes: int
    ignore_index: int
    per_image: list[np.ndarray] = field(default_factory=list)  # each [3, n_classes]: tp, fp, fn
    confusion: np.ndarray | None = None  # [true, predicted] pixel counts
    tokens_correct: int = 0
    tokens_valid: int = 0

    def __post_init__(self) -> None:
        if self.confusion is None:
            self.confusion = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)

    def add(
        self,
        predictions: Int[Tensor, "n_images n_tokens"],
        token_labels: Int[Tensor, "n_images n_tokens"],
        token_valid: Tensor,
        masks: Int[Tensor, "n_images h w"],
        grid: PixelMap | Int[Tensor, "n_images h w"],
    ) -> None:
        predictions = predictions.cpu().long()
        self.tokens_correct += int(((predictions == token_labels) & token_valid).sum())
        self.tokens_valid += int(token_valid.sum())
        pixels = tokens_to_pixels(predictions, grid).flatten(1)
        truth = masks.long().flatten(1)
        c, n = self.n_classes, truth.shape[0]
        keep = (truth != self.ignore_index) & (pixels >= 0)  # a pixel no token covers counts for no one
        image = torch.arange(n)[:, None].expand_as(truth)
        index = (image * c + truth.clamp(0, c - 1)) * c + pixels.clamp(min=0)
        pairs = torch.bincount(index[keep], minlength=n * c * c).view(n, c, c).numpy()
        self.confusion += pairs.sum(0)
        tp = np.diagonal(pairs, axis1=1, axis2=2)
        self.per_image.extend(np.stack([tp, pairs.sum(1) - tp, pairs.sum(2) - tp], axis=1))

    @property
    def token_accuracy(self) -> float:
        return self.tokens_correct / max(1, self.tokens_valid)

    @property
    def pixel_accuracy(self) -> float:
        return float(np.trace(self.confusion) / max(1, self.confusion.sum()))

    def class_iou(self) -> np.ndarray:
        """IoU per class over all images; NaN for classes absent from truth and prediction."""
        tp = np.diag(self.confusion).astype(float)
        union = self.confusion.sum(0) + self.confusion.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    @property
    def miou(self) -> float:
        return miou_from_counts(np.sum(self.per_image, axis=0)) if self.per_image else float("nan")

    def bootstrap_miou(self, resamples: np.ndarray) -> np.ndarray:
        """mIoU of each resample of images (`resamples`: [n_boot, n_images] indices)."""
        return miou_of_resamples(np.stack(self.per_image), resamples)


def miou_of_resamples(counts: np.ndarray, resamples: np.ndarray) -> np.ndarray:
    """`miou_from_counts` of every resample of images at once: `counts` [n_images, 3, n_classes],
    `resamples` [n_resamples, n_images] indices. Each resample's totals are its images' counts
    weighted by how often it drew them (exact: integer sums in float64)."""
    n_images = counts.shape[0]
    totals = resample_counts(resamples, n_images) @ counts.reshape(n_images, -1).astype(np.float64)
    totals = totals.reshape(len(resamples), *counts.shape[1:])
    tp, fp, fn = totals[:, 0], totals[:, 1], totals[:, 2]
    union = tp + fp + fn
    present = union > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(present, tp / np.where(present, union, 1.0), 0.0)
        return iou.sum(1) / present.sum(1)  # NaN where no class occurs at all


def miou_from_counts(counts: np.ndarray) -> float:
    """Mean IoU over classes that occur in the truth or the prediction; counts = [tp, fp, fn]."""
    tp, fp, fn = counts
    union = tp + fp + fn
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else float("nan")
