"""DeepSeek-VL hybrid's layout: DeepSeek-VL's fixed grid, which `gather("vision")` reads at SigLIP's
patches. SAM's tower (`vision.high_res.*`) has a finer patch grid of its own that no table of the
layout addresses, so an activation from it, given where a SigLIP one belongs (a probe site in the
high-res tower), is refused saying so, rather than failing as an activation of the wrong batch."""

from __future__ import annotations

from dataclasses import dataclass, fields

from jaxtyping import Float
from torch import Tensor

from ....errors import LayoutMismatchError
from ...images.layout import ImageTokenLayout, Stage


@dataclass(frozen=True, eq=False)
class TwoTowerLayout(ImageTokenLayout):
    high_res_grid: tuple[int, int] = (0, 0)  # SAM's patch grid per image

    @classmethod
    def around(cls, layout: ImageTokenLayout, high_res_grid: tuple[int, int]) -> "TwoTowerLayout":
        return cls(**{f.name: getattr(layout, f.name) for f in fields(layout)}, high_res_grid=high_res_grid)

    def gather(self, stage: Stage, activation: Tensor) -> Float[Tensor, "n_images n_tokens ..."]:
        rows, cols = self.high_res_grid
        if stage == "vision" and activation.ndim > 1 and tuple(activation.shape[:2]) == (self.vision_shape[0], rows * cols):
            raise LayoutMismatchError(
                f"a vision activation with {rows * cols} positions per image is from SAM's high-res tower "
                f"(vision.high_res.*, its {rows}x{cols} patch grid); the layout reads the vision stage at SigLIP's "
                f"{self.vision_shape[1]} patches, and probes are labelled on that grid. Probe vision.blocks.*, "
                "adapter.* or blocks.*; for the high-res tower, label its rows with model.architecture.high_res_grid "
                "(each patch's box, and the LLM token it lies in) and masks from model.geometry.high_res.transform_mask"
            )
        return super().gather(stage, activation)
