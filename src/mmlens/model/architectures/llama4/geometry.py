"""Llama 4's image geometry: each image resized without distortion onto the best canvas of whole
tiles, padded at the bottom and right, and cut into those tiles.

The canvas is chosen among every `rows x cols` arrangement of at most `max_patches` tiles of
`tile x tile` pixels (Hugging Face's `find_supported_resolutions` / `get_best_fit`): the smallest
upscale that fits the image, else the mildest downscale, the smaller area on a tie; an image is
upscaled at most to one tile's side unless `resize_to_max_canvas`. The image is resized, keeping its
aspect ratio, to fit that canvas and zero-padded to fill it. The layout lays the tiles (and the global
image, the whole image squashed to one tile) on the original image, its canvas, so label masks stay
as they are.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Shaped

from ...images.preprocess import ImageGeometry, MaskInput


class TilePlan(NamedTuple):
    """Where one image goes: its `rows x cols` tiles and the resized image's (height, width) in them."""

    rows: int
    cols: int
    content: tuple[int, int]


def _arrangements(max_tiles: int) -> list[tuple[int, int]]:
    """Every (rows, cols) of at most `max_tiles` tiles, in Hugging Face's order (by tile count, high
    first, then by rows), which decides ties of equal scale and area."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for count in range(max_tiles, 0, -1):
        for rows in sorted(r for r in range(1, count + 1) if count % r == 0):
            by_ratio.setdefault(rows / (count // rows), []).append((rows, count // rows))
    return [shape for shapes in by_ratio.values() for shape in shapes]


def _fit_without_distortion(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The largest (height, width) of `size`'s aspect ratio inside `target` (`get_max_res_without_distortion`)."""
    (height, width), (target_h, target_w) = size, target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.floor(height * scale_w), target_h), target_w
    return target_h, min(math.floor(width * scale_h), target_w)


def plan_tiles(size: tuple[int, int], tile: int, max_tiles: int, resize_to_max_canvas: bool = False) -> TilePlan:
    """Llama 4's tiling of an image of `size` (height, width): Hugging Face's `get_best_fit`, the
    upscale limit, and the resize without distortion, in float32 as its tensors compute them."""
    shapes = _arrangements(max_tiles)
    targets = torch.tensor([(r * tile, c * tile) for r, c in shapes])
    scale_h, scale_w = targets[:, 0] / size[0], targets[:, 1] / size[1]
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)
    up = scales[scales >= 1]
    chosen = (up.max() if resize_to_max_canvas else up.min()) if len(up) else scales[scales < 1].max()
    candidates = [i for i in range(len(shapes)) if scales[i] == chosen]
    best = min(candidates, key=lambda i: (int(targets[i, 0] * targets[i, 1]), candidates.index(i)))
    target_h, target_w = int(targets[best, 0]), int(targets[best, 1])
    if not resize_to_max_canvas:  # never upscale past one tile's side
        target_h, target_w = min(max(size[0], tile), target_h), min(max(size[1], tile), target_w)
    height, width = _fit_without_distortion(size, (target_h, target_w))
    return TilePlan(*shapes[best], (max(height, 1), max(width, 1)))


class OriginalCanvasGeometry:
    """Mask geometry of a Llama 4 processor: the layout's canvas is the original image (tiles and the
    global image are laid on it by `edges_on_original`), so a mask stays as it is."""

    image_size = staticmethod(ImageGeometry.image_size)

    def transform_mask(self, mask: MaskInput, ignore_index: int = 255) -> Shaped[np.ndarray, "H W"]:
        """The mask in the layout's canvas, the original image: unchanged (validated, copied)."""
        return np.array(ImageGeometry._mask_to_array(mask))
