"""Llama 4's image processor without torchvision (public: give a `Llama4Processor` built on it to
`HookedMLLM.from_hf` with a real checkpoint).

transformers 5.23 ships only a torchvision-backed Llama 4 image processor. This one replays its
steps on PIL: the tile plan of `geometry.py`, a bilinear resize without distortion, zero padding at
the bottom and right, rescale and normalise, the `rows x cols` tiles in raster order and, when there
is more than one tile, the whole image squashed to one tile (the global image) after them. It returns
what Hugging Face's returns (`pixel_values` [frames, 3, tile, tile], `aspect_ratios` [images, 2]), so
`Llama4Processor` expands each `<|image|>` into the tiles' and the global image's tokens itself.
Pixels differ from the torchvision processor's in the resampling filter's rounding and in its
bfloat16 normalisation; the geometry is the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import make_flat_list_of_images

from ...images.preprocess import ImageGeometry
from .geometry import plan_tiles


class Llama4ImageProcessorPil(BaseImageProcessor):
    """Llama 4's tiling on PIL; takes the torchvision processor's arguments that shape the output."""

    model_input_names = ["pixel_values"]

    def __init__(self, size: dict[str, int] | None = None, max_patches: int = 16, resize_to_max_canvas: bool = False,
                 image_mean: tuple[float, ...] = (0.5, 0.5, 0.5), image_std: tuple[float, ...] = (0.5, 0.5, 0.5),
                 rescale_factor: float = 1 / 255, **kwargs: Any):
        super().__init__(**kwargs)
        self.size = dict(size or {"height": 336, "width": 336})
        if self.size["height"] != self.size["width"]:
            raise ValueError(f"Llama 4 tiles are square; got size {self.size}")
        self.max_patches, self.resize_to_max_canvas = max_patches, resize_to_max_canvas
        self.image_mean, self.image_std, self.rescale_factor = list(image_mean), list(image_std), rescale_factor
        self.resample, self.do_rescale, self.do_normalize, self.do_convert_rgb = Image.Resampling.BILINEAR, True, True, True

    def _normalized(self, rgb: np.ndarray) -> torch.Tensor:
        """[3, H, W] float32 of a uint8 [H, W, 3] array, rescaled and normalised as the mask geometry's
        own pixel steps do it (one replay of them, shared)."""
        return torch.from_numpy(ImageGeometry(**ImageGeometry.pixel_steps(self))._to_float_chw(rgb))

    def preprocess(self, images: Any, return_tensors: Any = None, **kwargs: Any) -> BatchFeature:
        tile = self.size["height"]
        frames, ratios = [], []
        for image in make_flat_list_of_images(images):
            image = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
            plan = plan_tiles((image.height, image.width), tile, self.max_patches, self.resize_to_max_canvas)
            canvas = np.zeros((plan.rows * tile, plan.cols * tile, 3), np.uint8)
            height, width = plan.content
            canvas[:height, :width] = np.asarray(image.resize((width, height), self.resample))
            pixels = self._normalized(canvas)
            frames += [pixels[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
                       for r in range(plan.rows) for c in range(plan.cols)]
            if plan.rows * plan.cols > 1:
                frames.append(self._normalized(np.asarray(image.resize((tile, tile), self.resample))))
            ratios.append((plan.rows, plan.cols))
        data = {"pixel_values": torch.stack(frames), "aspect_ratios": torch.tensor(ratios)}
        return BatchFeature(data=data, tensor_type=return_tensors)
