"""How an InternVL (GotOcr2) image processor cuts an image into tiles, replayed from the image's size.

The processor picks a `cols x rows` grid of `T`-pixel tiles whose aspect ratio is closest to the
image's (`get_optimal_tiled_canvas`, between `min_patches` and `max_patches` tiles), resizes the
whole image to `cols*T x rows*T`, cuts the tiles in raster order and, when there is more than one,
appends the whole image resized to `T x T` (the thumbnail). It returns neither the grid nor the
image's size, so mmlens keeps the original size per image (`image_sizes`, a layout-only keyword)
and replays the grid choice here with the processor's own function and settings. Boxes live on the
original image: each cell holds the original pixels whose centres its resized pixels cover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Int, Shaped
from torch import Tensor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from ...images.preprocess import ImageGeometry, MaskInput


@dataclass(frozen=True)
class Tiling:
    """The processor's tiling settings, as its `__call__` merges them (processor defaults first)."""

    tile: int  # tile side in pixels (the processor's `size`, the tower's `image_size`)
    crop: bool  # crop_to_patches
    min_tiles: int
    max_tiles: int

    @staticmethod
    def from_processor(processor: Any) -> "Tiling":
        image_processor = getattr(processor, "image_processor", processor)
        merged: dict[str, Any] = {}
        if hasattr(processor, "_merge_kwargs") and hasattr(processor, "tokenizer"):
            # InternVLProcessor turns crop_to_patches on by default; ask it what it would use
            merged = processor._merge_kwargs(tokenizer_init_kwargs=processor.tokenizer.init_kwargs)["images_kwargs"]

        def setting(name: str) -> Any:
            value = merged.get(name)
            return getattr(image_processor, name) if value is None else value

        size = setting("size")
        height, width = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
        if height != width:
            raise ValueError(f"InternVL tiles are square; the processor's size is {height} x {width}")
        return Tiling(int(height), bool(setting("crop_to_patches")), int(setting("min_patches")), int(setting("max_patches")))

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of tiles for an image of (height, width) `size`: 1 x 1 when not cropping."""
        if not self.crop or self.max_tiles <= 1:
            return 1, 1
        cols, rows = get_optimal_tiled_canvas(tuple(size), (self.tile, self.tile), self.min_tiles, self.max_tiles)
        return rows, cols

    def n_frames(self, size: tuple[int, int]) -> int:
        """Tower inputs of one image: its tiles, plus the thumbnail when there are several."""
        rows, cols = self.grid(size)
        return rows * cols + (rows * cols > 1)


def edges_on_original(n: int, cell: int, resized: int, original: int) -> Int[Tensor, "n_plus_1"]:
    """Edges, in original pixels, of `n` consecutive cells of `cell` resized pixels each, when the
    `original`-pixel side was resized to `resized` pixels. Resized pixel i covers the original span
    [i * s, (i + 1) * s) with s = original / resized (what an antialiased resize averages), so a
    cell's box holds the original pixels whose centres fall in its cells' span: edge
    ceil(a * s - 1/2), in integers. Boxes tile the side; upscaled, some are empty."""
    starts = torch.arange(n + 1) * cell
    edges = torch.div(2 * starts * original + resized - 1, 2 * resized, rounding_mode="floor").clamp(0, original)
    edges[0], edges[-1] = 0, original
    return edges


class TileGeometry:
    """Mask geometry of an InternVL processor: the layout's canvas is the original image, so a mask
    stays as it is (tiles and thumbnail are both laid on it by `edges_on_original`)."""

    image_size = staticmethod(ImageGeometry.image_size)

    def __init__(self, processor: Any) -> None:
        self.tiling = Tiling.from_processor(processor)

    def transform_mask(self, mask: MaskInput, ignore_index: int = 255) -> Shaped[np.ndarray, "H W"]:
        """The mask in the layout's canvas, the original image: unchanged (validated, copied)."""
        return np.array(ImageGeometry._mask_to_array(mask))
