"""Vision grids besides a layout's own: a second vision tower's patches (DeepSeek-VL hybrid's SAM
beside SigLIP), each keyed by the hook-name prefix of the points computed on it.

Such a grid is read through a layout of the same images whose vision stage is that tower's patch
grid, its boxes on the layout's canvas so that its probes are scored against the same pixels as
every other site. Its labels come from the canvas the tower itself saw (a finer resize of the same
picture), so a patch is labelled by the pixels it read rather than by their downsampled copy; a grid
on the layout's own canvas (an earlier, finer stage of the same tower: FastVLM) is labelled there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ...errors import LayoutMismatchError
from .layout import ImageTokenLayout, Stage
from .pixel_map import PixelMap, TokenGrid


@dataclass(frozen=True, eq=False)
class VisionGrid:
    """The points under `prefix` (e.g. "vision.high_res"): `layout` reads them (`layout.gather("vision",
    ...)` gives [n_images, n_patches, d] in the grid's raster order, boxes on the layout's canvas);
    `label_pixels` is the same grid on the tower's own canvas, to which `model.geometry.<canvas>`
    (its `transform_mask`) carries a mask; `canvas` None: the layout's own (`model.transform_mask`)."""

    prefix: str
    layout: ImageTokenLayout
    label_pixels: PixelMap
    canvas: str | None


def grid_of_hook(prefixes: tuple[str, ...], hook: str) -> str | None:
    """The prefix among `prefixes` whose grid `hook` is computed on, or None (the layout's own)."""
    return next((p for p in prefixes if hook.startswith(p + ".")), None)


def blocks_on_grid(hook_names: Iterable[str], prefix: str) -> int:
    """How many blocks a second vision grid has: its `{prefix}.blocks.{i}.hook_resid_post` points."""
    return sum(1 for name in hook_names if name.startswith(f"{prefix}.blocks.") and name.endswith(".hook_resid_post"))


@dataclass(frozen=True, eq=False)
class RasterGridLayout(ImageTokenLayout):
    """A vision grid's own layout: its vision stage is [image, row * cols + col, ...] over `grids[1]`
    (the grid) in raster order, an attention point's heads concatenated as the probe reads them;
    anything else (scores and patterns, per query and key) is refused with `off_grid`'s message."""

    prefix: str = ""  # the hook prefix of the points on this grid

    def gather(self, stage: Stage, activation: Tensor) -> Float[Tensor, "n_images n_tokens ..."]:
        if stage != "vision":
            return super().gather(stage, activation)
        patches = self.on_raster(activation)
        rows, cols = self.grids[1].shape
        if patches.ndim < 2 or tuple(patches.shape[:2]) != (self.vision_shape[0], rows * cols):
            raise LayoutMismatchError(self.off_grid(activation))
        gathered = super().gather(stage, patches)
        return gathered.flatten(2) if gathered.ndim > 3 else gathered

    def on_raster(self, activation: Tensor) -> Tensor:
        """The activation as [image, row * cols + col, ...] where the grid computes it otherwise."""
        return activation

    def off_grid(self, activation: Tensor) -> str:
        rows, cols = self.grids[1].shape
        return (f"an activation of shape {tuple(activation.shape)} is not on the {rows}x{cols} grid of {self.prefix}.*: "
                f"probes there read points per image and position [{self.vision_shape[0]}, {rows * cols}, ...] (the "
                "residual stream, norms, MLP, an attention block's q, k, v, z). Attention scores and patterns are per "
                "query and key: probe hook_resid_post or attn.hook_z there instead")


def on_patch_grid(layout: ImageTokenLayout, patches: TokenGrid, patch_to_token: Int[Tensor, "n_patches"],
                  layout_type: type[RasterGridLayout] = RasterGridLayout, **fields: Any) -> RasterGridLayout:
    """`layout` (a fixed grid, one segment per image) read on another patch grid of the same images:
    its vision stage is [image, patch] in `patches`' raster order, boxes on the same canvas;
    `patch_to_token` is the LLM token each patch feeds. `layout_type` takes `fields` besides."""
    n = len(patches)

    def on_grid(span):
        (segment,) = span.segments
        image = torch.full((n,), int(segment.vision_index[0][0]))
        return replace(span, segments=(replace(segment, patches=patches.cells_grid, vision_index=(image, torch.arange(n)),
                                               patch_to_token=patch_to_token),))

    return layout_type(
        images=tuple(tuple(on_grid(span) for span in row) for row in layout.images), seq_len=layout.seq_len,
        vision_shape=(layout.vision_shape[0], n), adapter_shape=layout.adapter_shape, grids=(layout.grids[0], patches),
        **fields,
    )


def nested_patch_to_token(patches: TokenGrid, tokens: TokenGrid) -> Int[Tensor, "n_patches"]:
    """The token (raster index) of `tokens` whose box holds each cell's centre, both grids tiling one canvas."""
    boxes = patches.boxes.double()
    height, width = patches.image_size
    y = (boxes[:, 0] + boxes[:, 2]) / 2 / height
    x = (boxes[:, 1] + boxes[:, 3]) / 2 / width
    return torch.floor(y * tokens.rows).long() * tokens.cols + torch.floor(x * tokens.cols).long()
