"""Which image token paints which canvas pixel: one type, `PixelMap`, for every layout kind.

Probe metrics paint each token's prediction over its pixels, token labels count the classes under
each token's box, figures draw one image's painting and saved sweeps keep the map. A fixed-grid
family answers all of these with one `TokenGrid` every image shares; images with their own
segments (tiles, variable resolution) with `ImagePixelMaps`, per image the `gather` row under each
pixel. Callers ask the map and never which kind it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from ...errors import InputError, LayoutMismatchError

PAINTED = "pixel_map"  # how a saved sweep names a per-image map in its description (format 3)


def _edges(n: int, length: int, start: int = 0) -> Int[Tensor, "n_plus_1"]:
    """`n` equal cells over `length` pixels from `start`, floor-rounded like `TokenGrid`."""
    return start + torch.div(torch.arange(n + 1) * length, n, rounding_mode="floor")


class BoxPixels(NamedTuple):
    """Which token's box holds each pixel, as token labels count them: `cells` [n_images or 1,
    layers * h * w] (-1: no token), one layer per segment so that boxes may overlap (a base image
    under its tiles); `sizes` [n_images or 1, n_tokens], each box's pixel count; `layers`, how many
    times each image's pixels repeat along `cells`."""

    cells: Int[Tensor, "images pixels"]
    sizes: Tensor
    layers: int


class PixelMap(ABC):
    """For a set of images on a canvas of `canvas` = (height, width) pixels, which token (row of
    `ImageTokenLayout.gather`) paints each pixel and which pixels each token's box holds."""

    @property
    @abstractmethod
    def canvas(self) -> tuple[int, int]:
        """(height, width) of the pixel space, the largest image's where images differ."""

    @abstractmethod
    def paint(self, values: Int[Tensor, "n_images n_tokens"]) -> Int[Tensor, "n_images height width"]:
        """Every token's value over the pixels it paints; -1 where no token paints."""

    @abstractmethod
    def box_pixels(self, masks: Int[Tensor, "n_images height width"]) -> BoxPixels:
        """The pixels under each token's box for these masks (refused when they are not on this canvas)."""

    @abstractmethod
    def images(self, index: slice) -> "PixelMap":
        """The map of images `index` only (the canvas unchanged)."""

    @abstractmethod
    def raster(self, n_tokens: int) -> tuple[int, int]:
        """`n_tokens` token rows laid out as (rows, cols) for a heatmap: the grid's own shape when
        every image shares one, else one row in `gather` order."""

    @abstractmethod
    def saved_form(self, name: str) -> tuple[Any, dict[str, Tensor]]:
        """(JSON entry, tensors) that `load_pixel_map(name, entry, tensors)` reads back."""

    @staticmethod
    def concat(maps: Sequence["PixelMap"]) -> "PixelMap":
        """The map of several batches' images one after the other (the held-out set of a sweep)."""
        kinds = {type(m) for m in maps}
        if len(kinds) != 1:
            raise InputError("held-out batches mix images of one fixed grid with images of their own grids"
                             if kinds else "no pixel maps to join")
        return kinds.pop()._joined(list(maps))

    @classmethod
    @abstractmethod
    def _joined(cls, maps: list["PixelMap"]) -> "PixelMap":
        ...


@dataclass(frozen=True, eq=False)
class GridCells:
    """A rows x cols grid laid over a canvas by its pixel edges (end-exclusive, non-decreasing);
    cell (r, c) covers y_edges[r]:y_edges[r+1], x_edges[c]:x_edges[c+1]."""

    y_edges: Int[Tensor, "rows_plus_1"]
    x_edges: Int[Tensor, "cols_plus_1"]

    @property
    def rows(self) -> int:
        return len(self.y_edges) - 1

    @property
    def cols(self) -> int:
        return len(self.x_edges) - 1

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    def __len__(self) -> int:
        return self.rows * self.cols

    @staticmethod
    def uniform(rows: int, cols: int, height: int, width: int, top: int = 0, left: int = 0) -> "GridCells":
        """`rows` x `cols` equal cells over a `height` x `width` box at (top, left)."""
        return GridCells(_edges(rows, height, top), _edges(cols, width, left))

    @cached_property
    def cells(self) -> Int[Tensor, "n 2"]:
        r, c = torch.meshgrid(torch.arange(self.rows), torch.arange(self.cols), indexing="ij")
        return torch.stack([r.flatten(), c.flatten()], dim=1)

    @cached_property
    def boxes(self) -> Int[Tensor, "n 4"]:
        r, c = self.cells[:, 0], self.cells[:, 1]
        y, x = self.y_edges, self.x_edges
        return torch.stack([y[r], x[c], y[r + 1], x[c + 1]], dim=1)

    def index_map(self, height: int, width: int) -> Int[Tensor, "height width"]:
        """For every pixel of a `height` x `width` canvas, the cell containing it, or -1."""
        rows = torch.searchsorted(self.y_edges, torch.arange(height), right=True) - 1
        cols = torch.searchsorted(self.x_edges, torch.arange(width), right=True) - 1
        inside = (rows >= 0) & (rows < self.rows)
        inside_x = (cols >= 0) & (cols < self.cols)
        index = rows[:, None] * self.cols + cols[None, :]
        return torch.where(inside[:, None] & inside_x[None, :], index, torch.full_like(index, -1))

    def same_as(self, other: "GridCells") -> bool:
        return torch.equal(self.y_edges, other.y_edges) and torch.equal(self.x_edges, other.x_edges)


@dataclass(frozen=True)
class TokenGrid(PixelMap):
    """A rows x cols grid of tokens tiling an image of `image_size` = (height, width) pixels: the
    pixel map of every image of a fixed-grid family at once."""

    rows: int
    cols: int
    image_size: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    def __len__(self) -> int:
        return self.rows * self.cols

    @property
    def cells(self) -> Int[Tensor, "n_tokens 2"]:
        """(row, col) of every token, in raster order."""
        return self.cells_grid.cells

    @property
    def boxes(self) -> Int[Tensor, "n_tokens 4"]:
        """Pixel box (y0, x0, y1, x1) of every token, end-exclusive, in the preprocessed image."""
        return self.cells_grid.boxes

    @cached_property
    def cells_grid(self) -> GridCells:
        """The same grid as pixel edges over the image."""
        height, width = self.image_size
        return GridCells(_edges(self.rows, height), _edges(self.cols, width))

    def cell_index_map(self) -> Int[Tensor, "height width"]:
        """For every pixel, the index of the token whose box contains it."""
        height, width = self.image_size
        rows = torch.div(torch.arange(height) * self.rows, height, rounding_mode="floor")
        cols = torch.div(torch.arange(width) * self.cols, width, rounding_mode="floor")
        return rows[:, None] * self.cols + cols[None, :]

    # ------------------------------------------------------------- as a PixelMap
    @property
    def canvas(self) -> tuple[int, int]:
        return tuple(self.image_size)

    def paint(self, values: Int[Tensor, "n_images n_tokens"]) -> Int[Tensor, "n_images height width"]:
        return values[:, self.cell_index_map().to(values.device)]

    def box_pixels(self, masks: Int[Tensor, "n_images height width"]) -> BoxPixels:
        if tuple(masks.shape[1:]) != tuple(self.image_size):
            raise ValueError(
                f"masks are {tuple(masks.shape[1:])} pixels but the token grid tiles a "
                f"{self.image_size} image; transform masks with model.transform_mask first"
            )
        cell = self.cell_index_map().flatten()
        return BoxPixels(cell[None], torch.bincount(cell, minlength=len(self)).float()[None], 1)

    def images(self, index: slice) -> "TokenGrid":
        return self  # every image shares it

    def raster(self, n_tokens: int) -> tuple[int, int]:
        return self.shape

    def saved_form(self, name: str) -> tuple[Any, dict[str, Tensor]]:
        return [self.rows, self.cols, *self.image_size], {}

    @classmethod
    def _joined(cls, maps: list["PixelMap"]) -> "TokenGrid":
        if any(m != maps[0] for m in maps):
            grids = ", ".join(sorted({repr(m) for m in maps}))
            raise LayoutMismatchError(f"batches on different token grids ({grids}) cannot be scored as one set of images")
        return maps[0]


class ImagePixelMaps(PixelMap):
    """Per image, the `gather` row under each pixel of its own segments (tiles, variable grids),
    canvases padded to the largest. Built by the layout from each image's segment grids, it knows
    every box whole even where segments overlap (a finer tile paints over its base image); built from
    painted maps (a saved sweep, held-out batches joined), it knows only which row paints each pixel."""

    def __init__(self, canvas: tuple[int, int], segments: Sequence[Sequence[GridCells]] | None = None,
                 painted: Int[Tensor, "n_images height width"] | None = None):
        self._canvas = (int(canvas[0]), int(canvas[1]))
        self._segments = None if segments is None else tuple(tuple(s) for s in segments)
        if painted is not None:
            self.__dict__["painted"] = painted

    @classmethod
    def from_painted(cls, painted: Int[Tensor, "n_images height width"]) -> "ImagePixelMaps":
        return cls(tuple(painted.shape[1:]), painted=painted)

    @property
    def canvas(self) -> tuple[int, int]:
        return self._canvas

    @property
    def n_images(self) -> int:
        return len(self._segments) if self._segments is not None else len(self.painted)

    def _layers(self) -> Int[Tensor, "n_images n_segments pixels"]:
        """Per image and segment, the row whose box holds each pixel (-1: none), rows numbered on
        from the image's earlier segments."""
        height, width = self._canvas
        if self._segments is None:
            raise InputError("this pixel map was read back from painted maps (a saved sweep): it knows which token "
                             "paints each pixel, not the boxes finer segments paint over; label tokens from the "
                             "layout of the inputs (token_labels(masks, inputs.layout))")
        n_segments = max((len(s) for s in self._segments), default=0)
        out = torch.full((len(self._segments), n_segments, height * width), -1, dtype=torch.long)
        for k, grids in enumerate(self._segments):
            start = 0
            for s, grid in enumerate(grids):
                index = grid.index_map(height, width).flatten()
                out[k, s] = torch.where(index >= 0, index + start, index)
                start += len(grid)
        return out

    @cached_property
    def painted(self) -> Int[Tensor, "n_images height width"]:
        """Per image and pixel the row that paints it, or -1; where segments overlap the later,
        finer one paints."""
        layers = self._layers().view(self.n_images, -1, *self._canvas)
        out = torch.full((self.n_images, *self._canvas), -1, dtype=torch.long)
        for s in range(layers.shape[1]):
            out = torch.where(layers[:, s] >= 0, layers[:, s], out)
        return out

    def paint(self, values: Int[Tensor, "n_images n_tokens"]) -> Int[Tensor, "n_images height width"]:
        index = self.painted.to(values.device).long()
        if not values.shape[1]:  # images without grid tokens (learned queries): no token paints a pixel
            return torch.full(index.shape, -1, dtype=values.dtype, device=values.device)
        painted = values.gather(1, index.clamp(min=0).flatten(1)).view(index.shape)
        return torch.where(index >= 0, painted, torch.full_like(painted, -1))

    def box_pixels(self, masks: Int[Tensor, "n_images height width"]) -> BoxPixels:
        height, width = masks.shape[1:]
        if self.n_images != masks.shape[0]:
            raise ValueError(f"{masks.shape[0]} masks for {self.n_images} images")
        if self.n_images and self._canvas != (height, width):
            raise ValueError(
                f"masks are {(height, width)} pixels but the images' canvases are up to {self._canvas}; transform "
                "masks with model.transform_mask and pad them with the ignore index to the largest"
            )
        layers = self._layers()
        n_tokens = max((sum(len(grid) for grid in grids) for grids in self._segments), default=0)
        cells = layers.flatten(1)
        sizes = torch.zeros(self.n_images, n_tokens)
        if n_tokens:  # images without grid tokens (learned queries) have no boxes to count
            sizes.scatter_add_(1, cells.clamp(min=0), (cells >= 0).float())
        return BoxPixels(cells, sizes, layers.shape[1])

    def images(self, index: slice) -> "ImagePixelMaps":
        if self._segments is not None:
            return ImagePixelMaps(self._canvas, self._segments[index])
        return ImagePixelMaps(self._canvas, painted=self.painted[index])

    def raster(self, n_tokens: int) -> tuple[int, int]:
        return 1, n_tokens

    def saved_form(self, name: str) -> tuple[Any, dict[str, Tensor]]:
        return PAINTED, {f"{PAINTED}_{name}": self.painted.contiguous()}

    @classmethod
    def _joined(cls, maps: list["PixelMap"]) -> "ImagePixelMaps":
        height = max(m.canvas[0] for m in maps)
        width = max(m.canvas[1] for m in maps)
        out = torch.full((sum(m.n_images for m in maps), height, width), -1, dtype=torch.long)
        start = 0
        for m in maps:
            out[start : start + m.n_images, : m.canvas[0], : m.canvas[1]] = m.painted
            start += m.n_images
        return cls.from_painted(out)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImagePixelMaps) or (self._canvas, self.n_images) != (other._canvas, other.n_images):
            return False
        if self._segments is not None and other._segments is not None:
            return all(len(a) == len(b) and all(x.same_as(y) for x, y in zip(a, b))
                       for a, b in zip(self._segments, other._segments))
        return torch.equal(self.painted, other.painted)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ImagePixelMaps({self.n_images} images, canvas {self._canvas})"


def load_pixel_map(name: str, entry: Any, tensors: dict[str, Tensor]) -> PixelMap:
    """The map `saved_form(name)` wrote: a shared grid as [rows, cols, height, width], per-image
    maps as "pixel_map" with the tensor `pixel_map_<name>` (sweep format 3)."""
    if entry == PAINTED:
        return ImagePixelMaps.from_painted(tensors[f"{PAINTED}_{name}"])
    rows, cols, *size = entry
    return TokenGrid(rows, cols, tuple(size))


def as_pixel_map(pixels: PixelMap | Int[Tensor, "n_images height width"]) -> PixelMap:
    """`pixels` as a PixelMap: a tensor is taken as painted maps (`ImageTokenLayout.pixel_map`)."""
    return pixels if isinstance(pixels, PixelMap) else ImagePixelMaps.from_painted(pixels)


__all__ = ["BoxPixels", "GridCells", "ImagePixelMaps", "PixelMap", "TokenGrid", "as_pixel_map", "load_pixel_map"]
