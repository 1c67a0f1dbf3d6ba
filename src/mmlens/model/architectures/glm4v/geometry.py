"""GLM-4V's image geometry: Qwen2-VL's per-image resize to multiples of (patch x merge) pixels, with
GLM's own size rule.

GLM's `smart_resize` counts the pixels of a clip of `temporal_patch_size` frames against its
`min_pixels` / `max_pixels` bounds (a still image is that many copies), rounds each side to the
nearest multiple first and scales a side shorter than one multiple up to it; there is no padding or
crop. Masks follow it with nearest-neighbour resampling onto the image's canvas.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from transformers.models.glm4v.image_processing_pil_glm4v import smart_resize

from ..qwen2_vl.geometry import SmartResizeGeometry


@dataclass(frozen=True)
class GlmResizeGeometry(SmartResizeGeometry):
    """`SmartResizeGeometry` whose size rule is GLM-4V's `smart_resize` over `temporal_factor` frames."""

    temporal_factor: int = 2

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(self.temporal_factor, height, width, temporal_factor=self.temporal_factor,
                            factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    @classmethod
    def from_processor(cls, processor: Any) -> "GlmResizeGeometry":
        """Read a GLM-4V image processor (or a processor holding one)."""
        qwen = SmartResizeGeometry.from_processor(processor)
        ip = getattr(processor, "image_processor", processor)
        return cls(**{f.name: getattr(qwen, f.name) for f in fields(qwen)}, temporal_factor=ip.temporal_patch_size)
