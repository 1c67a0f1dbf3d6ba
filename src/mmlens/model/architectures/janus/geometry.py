"""Janus's image geometry: the longest side resized to the model's square size (the short side
rounded, never below `min_size`), then padded to a square, centred, with the mean colour.

LLaVA pads to a square before it resizes; Janus resizes first, so the padding it adds is whole
pixels of the output and a mask's padding is `ignore_index` there, not resampled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from jaxtyping import Shaped
from PIL import Image

from ...images.preprocess import ImageGeometry, MaskInput, _pad_square, _torchvision_resize


@dataclass(frozen=True)
class ResizeThenPadGeometry(ImageGeometry):
    """`ImageGeometry` whose resize is Janus's (longest side to `side`, `round` on the other, at
    least `min_size`) followed by a centred pad to `side` x `side` (`JanusImageProcessorPil`)."""

    side: int = 384
    min_size: int = 14

    @classmethod
    def from_processor(cls, processor: Any) -> "ResizeThenPadGeometry":
        ip = getattr(processor, "image_processor", processor)
        side = int(ip.size["height"])
        from transformers.image_processing_backends import TorchvisionBackend

        backend = "torchvision" if isinstance(ip, TorchvisionBackend) else "pil"
        return cls(resize=(side, side), **ImageGeometry.pixel_steps(ip), side=side, min_size=int(ip.min_size),
                   pad_to_square=bool(ip.do_pad), backend=backend)

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        scale = self.side / max(height, width)
        return max(round(height * scale), self.min_size), max(round(width * scale), self.min_size)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        height, width = self._resized_size(height, width)
        side = max(height, width)
        return (side, side) if self.pad_to_square else (height, width)

    @property
    def pad_color(self) -> tuple[int, int, int]:
        return tuple(int(m * 255) for m in self.image_mean) if self.image_mean else (127, 127, 127)

    def _transform_rgb_array(self, array: np.ndarray) -> np.ndarray:
        height, width = self._resized_size(*array.shape[:2])
        if self.backend == "torchvision":
            array = _torchvision_resize(array, (height, width), self.resample)
        else:
            array = np.asarray(Image.fromarray(np.ascontiguousarray(array)).resize((width, height), resample=self.resample))
        return _pad_square(array, np.asarray(self.pad_color, dtype=np.uint8)) if self.pad_to_square else array

    def transform_mask(self, mask: MaskInput, ignore_index: int = 255) -> Shaped[np.ndarray, "H W"]:
        array = self._mask_to_array(mask)
        small = array.dtype in (np.uint8, np.bool_) and 0 <= int(ignore_index) <= 255
        array = array.astype(np.uint8 if small else np.int32)
        height, width = self._resized_size(*array.shape)
        array = np.asarray(Image.fromarray(np.ascontiguousarray(array)).resize((width, height), Image.Resampling.NEAREST))
        if self.pad_to_square:
            array = _pad_square(array, int(ignore_index))
        return np.array(array, dtype=np.uint8 if small else np.int64)
