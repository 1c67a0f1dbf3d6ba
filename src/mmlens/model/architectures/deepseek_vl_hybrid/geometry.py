"""DeepSeek-VL hybrid's two resolutions of one image: Janus's resize-then-pad at the high-res side
(SAM's canvas, `high_res_pixel_values`), then that square resized to the low-res side (SigLIP's
canvas, `pixel_values`, the layout's).

Both canvases hold the same picture, so a box in one is the same fraction of the other. SigLIP's
patch grid is the LLM's token grid; SAM's finer patch grid reaches the same grid through the
resize and the two strided convolutions, so each SAM patch is assigned the LLM token whose box
holds its centre (`HighResGrid`), and its ground truth is the mask on the high-res canvas.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import cached_property
from typing import Any

import numpy as np
from jaxtyping import Int, Shaped
from torch import Tensor

from ...images.pixel_map import TokenGrid
from ...images.preprocess import MaskInput
from ...images.vision_grids import nested_patch_to_token
from ..janus.geometry import ResizeThenPadGeometry


@dataclass(frozen=True)
class TwoResolutionGeometry(ResizeThenPadGeometry):
    """The low-res canvas's geometry (what `transform_mask` and `to_pixel_values` give, as the
    processor's `pixel_values`); `high_res` is the high-res canvas's (`high_res_pixel_values`)."""

    high_res: ResizeThenPadGeometry | None = None

    @classmethod
    def from_processor(cls, processor: Any) -> "TwoResolutionGeometry":
        ip = getattr(processor, "image_processor", processor)
        low = ResizeThenPadGeometry.from_processor(ip)
        side = int(ip.high_res_size["height"])
        high = replace(low, resize=(side, side), side=side, resample=int(ip.high_res_resample),
                       image_mean=tuple(ip.high_res_image_mean), image_std=tuple(ip.high_res_image_std))
        return cls(**{f.name: getattr(low, f.name) for f in fields(low)}, high_res=high)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return super().output_size(*self.high_res.output_size(height, width))

    def _transform_rgb_array(self, array: np.ndarray) -> np.ndarray:
        return super()._transform_rgb_array(self.high_res._transform_rgb_array(array))

    def transform_mask(self, mask: MaskInput, ignore_index: int = 255) -> Shaped[np.ndarray, "H W"]:
        return super().transform_mask(self.high_res.transform_mask(mask, ignore_index), ignore_index)


@dataclass(frozen=True)
class HighResGrid:
    """SAM's patch grid on the high-res canvas and the LLM token grid it feeds."""

    patch_grid: tuple[int, int]
    canvas: tuple[int, int]
    token_grid: tuple[int, int]

    @cached_property
    def patches(self) -> TokenGrid:
        """Each SAM patch's cell and pixel box on the high-res canvas (what a probe on
        `vision.high_res.*` is labelled with, masks given by `geometry.high_res.transform_mask`)."""
        return TokenGrid(*self.patch_grid, self.canvas)

    @cached_property
    def patch_to_token(self) -> Int[Tensor, "n_patches"]:
        """The LLM grid token (raster index) whose box holds each SAM patch's centre."""
        return nested_patch_to_token(self.patches, TokenGrid(*self.token_grid, self.canvas))
