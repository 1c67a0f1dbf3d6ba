"""Mistral 3's image geometry: every image scaled down to fit the longest edge, sides rounded up to
multiples of patch size x merge size (Hugging Face's Pixtral resize); the batch's zero padding lies
outside the image's canvas, so label masks follow the resize alone (nearest-neighbour).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from transformers.models.pixtral.image_processing_pil_pixtral import get_resize_output_image_size

from ...images.preprocess import ImageGeometry
from .processor import Mistral3Processor


@dataclass(frozen=True)
class PixtralGeometry(ImageGeometry):
    """`ImageGeometry` whose resize is Pixtral's (Hugging Face's `get_resize_output_image_size`):
    scaled down, never up, to fit `longest_edge` (floor), then each side rounded up to a multiple
    of `factor` = patch size x merge size. The batch padding lies outside the image's canvas."""

    factor: int = 28
    longest_edge: int = 1024

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        shape_only = np.broadcast_to(np.zeros((), dtype=np.uint8), (height, width, 3))  # no memory
        size = get_resize_output_image_size(shape_only, (self.longest_edge,) * 2, (self.factor,) * 2, "channels_last")
        return int(size[0]), int(size[1])

    @classmethod
    def from_processor(cls, processor: Mistral3Processor) -> "PixtralGeometry":
        ip = processor.image_processor
        factor = processor.patch_size * processor.spatial_merge_size
        return cls(
            resize=(factor, factor),  # the smallest output, only to say that images are resized
            **ImageGeometry.pixel_steps(ip),
            factor=factor,
            longest_edge=int(ip.size["longest_edge"]),
        )
