"""FastVLM's layout: LLaVA's fixed grid on the final feature map (one 64 px cell per LLM token), which
`gather("vision")` reads at `vision.blocks.*`, the last stage's entry points and `vision.hook_final_conv`.

The stages before the last halving work on finer grids (1/4, 1/8 ... of the image's side); each is a
vision grid of its own (`vision_grids["vision.stages.{s}"]`): its feature map's positions in raster
order (timm's, HF's flatten order), their boxes on the layout's canvas, which is also the canvas the
tower read, so probes there are labelled and scored on the same masks as every other site. A finer
activation given where a final-grid one belongs is refused saying which grid it is on; a stage's grid
refuses points that are not per position (attention scores and patterns)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

from jaxtyping import Float
from torch import Tensor

from ....errors import LayoutMismatchError
from ...images.layout import ImageTokenLayout, Stage
from ...images.pixel_map import TokenGrid
from ...images.vision_grids import VisionGrid, nested_patch_to_token, on_patch_grid


@dataclass(frozen=True, eq=False)
class MultiScaleLayout(ImageTokenLayout):
    # the stages before the final grid: (hook prefix, its cell size in pixels), in pipeline order
    stage_grids: tuple[tuple[str, int], ...] = ()
    embed_cell: int = 0  # the stem's output (`vision.hook_embed`): its cell size in pixels

    @classmethod
    def around(cls, layout: ImageTokenLayout, stage_grids, embed_cell: int) -> "MultiScaleLayout":
        return cls(**{f.name: getattr(layout, f.name) for f in fields(layout)}, stage_grids=tuple(stage_grids),
                   embed_cell=embed_cell)

    @cached_property
    def vision_grids(self) -> dict[str, VisionGrid]:
        """Each finer stage's feature map, for the points under `vision.stages.{s}`."""
        if self.grids is None:
            return {}
        tokens, grids = self.grids[0], {}
        for prefix, cell in self.stage_grids:
            height, width = tokens.image_size
            patches = TokenGrid(height // cell, width // cell, tokens.image_size)
            layout = on_patch_grid(self, patches, nested_patch_to_token(patches, tokens), prefix=prefix)
            grids[prefix] = VisionGrid(prefix, layout, patches, canvas=None)
        return grids

    def gather(self, stage: Stage, activation: Tensor) -> Float[Tensor, "n_images n_tokens ..."]:
        if stage == "vision" and activation.ndim > 2 and activation.shape[0] == self.vision_shape[0] \
                and activation.shape[1] != self.vision_shape[1] and self.grids is not None:
            height, width = self.grids[0].image_size
            for cell in dict.fromkeys([self.embed_cell, *(c for _, c in self.stage_grids)]):
                rows, cols = height // cell, width // cell
                if activation.shape[1] == rows * cols:
                    on_it = [prefix for prefix, c in self.stage_grids if c == cell]
                    final_rows, final_cols = self.grids[0].shape
                    embed = "vision.hook_embed" + (" and " if on_it else "") if cell == self.embed_cell else ""
                    stage = on_it[0] if on_it else "vision.stages.{s}"
                    raise LayoutMismatchError(
                        f"a vision activation with {rows * cols} positions per image is on the {rows}x{cols} grid of "
                        f"{embed}{' and '.join(p + '.*' for p in on_it)} ({cell} px cells); the layout's vision stage "
                        f"is the final {final_rows}x{final_cols} grid (the LLM's tokens). Read a stage's points through "
                        f"layout.on_grid('{stage}') (probe sites on {stage}.* do), which has that stage's cells, their "
                        f"boxes and their labels; each final cell covers {rows // final_rows}x{cols // final_cols} of them"
                    )
        return super().gather(stage, activation)
