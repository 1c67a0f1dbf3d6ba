"""DeepSeek-VL hybrid's layout: DeepSeek-VL's fixed grid, which `gather("vision")` reads at SigLIP's
patches, and SAM's finer patch grid as a second vision grid (`vision_grids["vision.high_res"]`), which
probes on `vision.high_res.*` read through.

SAM's grid is read per image in raster order: residual points are [image, row * width + col, d]
already; the attention points of a windowed block ([image x window, window position, head, d_head],
windows cut from the map zero-padded to whole windows) are put back on the raster and the padding
dropped. Its boxes lie on the layout's (SigLIP's) canvas, where every site is scored; its labels
come from the high-res canvas SAM read (`geometry.high_res`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

from jaxtyping import Float
from torch import Tensor

from ....errors import LayoutMismatchError
from ...images.layout import ImageTokenLayout, Stage
from ...images.pixel_map import TokenGrid
from ...images.vision_grids import RasterGridLayout, VisionGrid, on_patch_grid
from .geometry import HighResGrid

HIGH_RES_PREFIX = "vision.high_res"
HIGH_RES_CANVAS = "high_res"  # `geometry.high_res` carries a mask onto SAM's canvas


@dataclass(frozen=True, eq=False)
class SamGridLayout(RasterGridLayout):
    """The layout of SAM's patch grid: its vision stage is [image, patch] in raster order; `window`
    (SAM's window size; 0 for none) lets `gather` read a windowed block's per-window points too."""

    raster: tuple[int, int] = (0, 0)
    window: int = 0

    def off_grid(self, activation: Tensor) -> str:
        rows, cols = self.raster
        n_windows = self.vision_shape[0] * _windows(rows, self.window) * _windows(cols, self.window)
        return (
            f"an activation of shape {tuple(activation.shape)} is not on SAM's {rows}x{cols} patch grid: probes on "
            f"{HIGH_RES_PREFIX}.* read points per image [{self.vision_shape[0]}, {rows * cols}, ...] (the residual "
            f"stream, norms, MLP, a global block's attention) or per window [{n_windows}, {self.window ** 2}, ...] "
            "(q, k, v, z, result of a windowed block). Attention scores and patterns are per query and key, and "
            "the neck's resized and projected maps are on other grids: probe hook_resid_post or hook_z there instead"
        )

    def on_raster(self, activation: Tensor) -> Tensor:
        """A windowed block's per-window point back on the raster, [image, rows * cols, ...] without
        the padding; any other activation unchanged."""
        rows, cols = self.raster
        size, n_images = self.window, self.vision_shape[0]
        across, down = _windows(cols, size), _windows(rows, size)
        if size <= 0 or activation.ndim < 2 or tuple(activation.shape[:2]) == (n_images, rows * cols) \
                or tuple(activation.shape[:2]) != (n_images * down * across, size * size):
            return activation
        rest = activation.shape[2:]
        # HF's window_partition: [image, down, size, across, size] -> windows [image, down, across, size, size]
        grid = activation.reshape(n_images, down, across, size, size, *rest).transpose(2, 3)
        return grid.reshape(n_images, down * size, across * size, *rest)[:, :rows, :cols].flatten(1, 2)


def _windows(side: int, size: int) -> int:
    return -(-side // size) if size > 0 else 1


@dataclass(frozen=True, eq=False)
class TwoTowerLayout(ImageTokenLayout):
    """DeepSeek-VL's fixed grid (SigLIP's patches, the LLM's tokens) and SAM's patch grid beside it."""

    high_res_grid: tuple[int, int] = (0, 0)  # SAM's patch grid per image
    high_res: HighResGrid | None = None
    high_res_window: int = 0

    @classmethod
    def around(cls, layout: ImageTokenLayout, high_res: HighResGrid, window: int) -> "TwoTowerLayout":
        return cls(**{f.name: getattr(layout, f.name) for f in fields(layout)}, high_res_grid=high_res.patch_grid,
                   high_res=high_res, high_res_window=window)

    @cached_property
    def vision_grids(self) -> dict[str, VisionGrid]:
        """SAM's patch grid, for the points under `vision.high_res`."""
        if self.high_res is None or self.grids is None:
            return {}
        high_res, tokens = self.high_res, self.grids[0]
        patches = TokenGrid(*high_res.patch_grid, tokens.image_size)  # the same fractions of SigLIP's canvas
        layout = on_patch_grid(self, patches, high_res.patch_to_token, SamGridLayout, prefix=HIGH_RES_PREFIX,
                               raster=high_res.patch_grid, window=self.high_res_window)
        return {HIGH_RES_PREFIX: VisionGrid(HIGH_RES_PREFIX, layout, high_res.patches, HIGH_RES_CANVAS)}

    def gather(self, stage: Stage, activation: Tensor) -> Float[Tensor, "n_images n_tokens ..."]:
        rows, cols = self.high_res_grid
        if stage == "vision" and activation.ndim > 1 and tuple(activation.shape[:2]) == (self.vision_shape[0], rows * cols):
            raise LayoutMismatchError(
                f"a vision activation with {rows * cols} positions per image is from SAM's high-res tower "
                f"({HIGH_RES_PREFIX}.*, its {rows}x{cols} patch grid); the layout's vision stage is SigLIP's "
                f"{self.vision_shape[1]} patches. Read SAM's points through layout.on_grid({HIGH_RES_PREFIX!r}) "
                "(probe sites on vision.high_res.* do), which has SAM's patches, their boxes and their labels"
            )
        return super().gather(stage, activation)
