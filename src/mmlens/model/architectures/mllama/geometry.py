"""How label masks follow Mllama's processor onto the tile canvas the layout's cells live on.

The processor picks the canvas of `rows x cols` tiles that fits the image best (at most
`max_image_tiles` tiles), resizes the image into it keeping its aspect ratio, and pads below and to
the right. A mask takes the same resize (nearest neighbour) and its padding is `ignore_index`, using
the processor's own canvas functions so the two cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Shaped
from PIL import Image

from ...images.preprocess import ImageGeometry, MaskInput


@dataclass(frozen=True)
class TileCanvasGeometry:
    """Mask geometry of an `MllamaImageProcessor` with tiles of `tile` pixels, at most `max_tiles`."""

    tile: int
    max_tiles: int

    image_size = staticmethod(ImageGeometry.image_size)

    def canvas(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(canvas height, width) and the (height, width) the image is resized to inside it."""
        from transformers.models.mllama.image_processing_pil_mllama import (
            get_image_size_fit_to_canvas, get_optimal_tiled_canvas)

        canvas = get_optimal_tiled_canvas(height, width, max_image_tiles=self.max_tiles, tile_size=self.tile)
        return canvas, get_image_size_fit_to_canvas(height, width, *canvas, tile_size=self.tile)

    def transform_mask(self, mask: MaskInput, ignore_index: int = 255) -> Shaped[np.ndarray, "H W"]:
        array = ImageGeometry._mask_to_array(mask)
        small = array.dtype in (np.uint8, np.bool_) and 0 <= ignore_index <= 255
        array = array.astype(np.uint8 if small else np.int32)
        (canvas_h, canvas_w), (height, width) = self.canvas(*array.shape)
        resized = np.asarray(Image.fromarray(np.ascontiguousarray(array)).resize((width, height), Image.Resampling.NEAREST))
        out = np.full((canvas_h, canvas_w), ignore_index, dtype=np.uint8 if small else np.int64)
        out[:height, :width] = resized
        return out


__all__ = ["TileCanvasGeometry"]
