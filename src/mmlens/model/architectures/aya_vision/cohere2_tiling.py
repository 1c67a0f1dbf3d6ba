"""Cohere2-Vision's tiling, replayed from an image's size, and its image processor without torchvision.

Cohere2-Vision's processor picks its `cols x rows` canvas of `T`-pixel tiles otherwise than GotOcr2:
among every arrangement of at most `max_patches` tiles (by area, smallest first) it takes the one
needing the smallest upscale that still covers the image, or, when none covers it, the one needing
the mildest downscale (its `get_optimal_tiled_canvas`; `min_patches` plays no part). It then resizes
the image to the canvas, cuts the tiles in raster order and, beside several tiles, appends the image
resized to one tile (the thumbnail), as GotOcr2 does. transformers 5.23 ships that processor on
torchvision only; `Cohere2VisionImageProcessorPil` replays it on PIL (bicubic resize, CLIP's mean
and std), returning what it returns (`pixel_values` [frames, 3, T, T], `num_patches` per image).
Pixels differ from the torchvision processor's in the resampling filter's rounding; the geometry is the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, make_flat_list_of_images

from ...images.preprocess import ImageGeometry
from ..internvl.geometry import Tiling


def cohere2_canvas(size: tuple[int, int], tile: int, max_tiles: int) -> tuple[int, int]:
    """(cols, rows) of tiles Cohere2-Vision's processor gives an image of (height, width) `size`."""
    shapes = sorted(((cols, rows) for cols in range(1, max_tiles + 1) for rows in range(1, max_tiles + 1)
                     if cols * rows <= max_tiles), key=lambda shape: shape[0] * shape[1])
    height, width = size
    scales = (np.array(shapes) * tile / np.stack([width, height])).min(axis=-1)
    if np.all(scales < 1):
        return shapes[int(np.argmax(scales))]
    return shapes[int(np.argmin(np.where(scales < 1.0, 10e9, scales)))]


@dataclass(frozen=True)
class Cohere2Tiling(Tiling):
    """The processor's settings with Cohere2-Vision's canvas rule in place of GotOcr2's."""

    @staticmethod
    def from_processor(processor: Any) -> "Cohere2Tiling":
        return Cohere2Tiling(**asdict(Tiling.from_processor(processor)))

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        if not self.crop or self.max_tiles <= 1:
            return 1, 1
        cols, rows = cohere2_canvas(size, self.tile, self.max_tiles)
        return rows, cols


class Cohere2VisionImageProcessorPil(BaseImageProcessor):
    """Cohere2-Vision's tiling on PIL; takes the torchvision processor's arguments that shape the
    output. `patch_size` is what `Cohere2VisionProcessor` reads as the tokens per tile side."""

    model_input_names = ["pixel_values"]

    def __init__(self, size: dict[str, int] | None = None, patch_size: int = 16, crop_to_patches: bool = True,
                 min_patches: int = 1, max_patches: int = 12, **kwargs: Any):
        super().__init__(**kwargs)
        self.size = dict(size or {"height": 512, "width": 512})
        if self.size["height"] != self.size["width"]:
            raise ValueError(f"Cohere2-Vision tiles are square; got size {self.size}")
        self.patch_size, self.crop_to_patches, self.min_patches, self.max_patches = patch_size, crop_to_patches, min_patches, max_patches
        self.image_mean, self.image_std, self.rescale_factor = list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD), 1 / 255
        self.resample, self.do_rescale, self.do_normalize, self.do_convert_rgb = Image.Resampling.BICUBIC, True, True, True

    def _normalized(self, image: Image.Image, height: int, width: int) -> torch.Tensor:
        """[3, height, width] float32 of `image` resized, rescaled and normalised (the mask geometry's steps)."""
        rgb = np.asarray(image.resize((width, height), self.resample))
        return torch.from_numpy(ImageGeometry(**ImageGeometry.pixel_steps(self))._to_float_chw(rgb))

    def preprocess(self, images: Any, return_tensors: Any = None, **kwargs: Any) -> BatchFeature:
        tiling = Cohere2Tiling(self.size["height"], bool(kwargs.get("crop_to_patches", self.crop_to_patches)),
                               self.min_patches, int(kwargs.get("max_patches", self.max_patches)))
        tile, frames, counts = tiling.tile, [], []
        for image in make_flat_list_of_images(images):
            image = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
            rows, cols = tiling.grid((image.height, image.width))
            canvas = self._normalized(image, rows * tile, cols * tile)
            frames += [canvas[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
            if rows * cols > 1:
                frames.append(self._normalized(image, tile, tile))
            counts.append(tiling.n_frames((image.height, image.width)))
        return BatchFeature(data={"pixel_values": torch.stack(frames), "num_patches": counts}, tensor_type=return_tensors)
