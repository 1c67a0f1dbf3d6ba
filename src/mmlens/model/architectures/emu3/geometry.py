"""Emu3's image geometry: each image resized on its own by Emu3's `smart_resize` (sides multiples of
the VQ encoder's spatial factor, area between `min_pixels` and `max_pixels`), then zero-padded at the
bottom and right to the batch's largest; the padding is outside the image's canvas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers.models.emu3.image_processing_emu3 import smart_resize

from ...images.preprocess import ImageGeometry
from ..qwen2_vl.geometry import SmartResizeGeometry


@dataclass(frozen=True)
class Emu3Geometry(SmartResizeGeometry):
    """`SmartResizeGeometry` with Emu3's resize rule and its processor's fields (`spatial_factor`,
    `min_pixels`, `max_pixels`)."""

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    @classmethod
    def from_processor(cls, processor: Any) -> "Emu3Geometry":
        ip = getattr(processor, "image_processor", processor)
        factor = int(ip.spatial_factor)
        return cls(resize=(factor, factor), **ImageGeometry.pixel_steps(ip), factor=factor,
                   min_pixels=int(ip.min_pixels), max_pixels=int(ip.max_pixels))
