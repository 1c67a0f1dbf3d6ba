"""Gemma 4's image geometry: each image resized, keeping its aspect ratio, to the largest size whose
sides are multiples of patch size x pooling kernel within the processor's patch budget (Hugging
Face's `get_aspect_ratio_preserving_size`); pixels rescaled to [0, 1], not normalised. The batch's
padding patches lie outside the canvas, so label masks follow the resize alone (nearest-neighbour).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

from ...images.preprocess import ImageGeometry


@dataclass(frozen=True)
class Gemma4Geometry(ImageGeometry):
    """`ImageGeometry` whose resize is Gemma 4's aspect-preserving one."""

    patch_size: int = 16
    pooling: int = 3
    max_soft_tokens: int = 280

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        return get_aspect_ratio_preserving_size(height, width, self.patch_size, self.max_soft_tokens * self.pooling**2,
                                                self.pooling)

    @classmethod
    def from_processor(cls, processor: Any) -> "Gemma4Geometry":
        ip = getattr(processor, "image_processor", processor)
        side = ip.patch_size * ip.pooling_kernel_size
        return cls(resize=(side, side),  # the smallest output, only to say that images are resized
                   **ImageGeometry.pixel_steps(ip), patch_size=ip.patch_size, pooling=ip.pooling_kernel_size,
                   max_soft_tokens=ip.max_soft_tokens)
