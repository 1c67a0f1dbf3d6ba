"""Qwen2-VL's image geometry: every image resized on its own to a multiple of (patch x merge) pixels.

The processor's `smart_resize` keeps the aspect ratio as closely as it can with both sides
multiples of `factor` = patch size x merge size and the area between `min_pixels` and
`max_pixels`; there is no padding or crop. Label masks go through the same size rule with
nearest-neighbour resampling, so a mask lands on the image's canvas (`ImageSpan.canvas`), the
pixels the layout's boxes are in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from ...images.preprocess import ImageGeometry


@dataclass(frozen=True)
class SmartResizeGeometry(ImageGeometry):
    """`ImageGeometry` whose resize is Qwen2-VL's `smart_resize` (`resize` holds the smallest
    output, `(factor, factor)`, only to say that images are resized)."""

    factor: int = 28
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    @classmethod
    def from_processor(cls, processor: Any) -> "SmartResizeGeometry":
        """Read a Qwen2-VL image processor (or a processor holding one)."""
        ip = getattr(processor, "image_processor", processor)
        factor = ip.patch_size * ip.merge_size
        return cls(
            resize=(factor, factor),
            **ImageGeometry.pixel_steps(ip),
            factor=factor,
            min_pixels=int(ip.size["shortest_edge"]),
            max_pixels=int(ip.size["longest_edge"]),
        )
