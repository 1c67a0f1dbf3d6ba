"""The "anyres" technique (LLaVA-NeXT, LLaVA-OneVision): an image cut into tower-sized tiles of its best grid resolution.

Such a processor resizes each image into its best grid resolution (aspect kept, the rest padded),
cuts tower-sized tiles from it and puts a squashed copy of the whole image first; the model joins
the tiles' features into one grid and removes what only saw padding. `AnyresTiling` is one image's
tiles and kept features in the processor's and the model's own arithmetic; `edges_back` maps
feature rows back onto the original image. A tiled family's layout puts its pixel boxes on the
ORIGINAL image, so `AnyresGeometry.transform_mask` leaves a mask in the original pixels, and
`tile_masks` sends a mask through the processor's own tiling code (its `get_image_patches`, with
nearest-neighbour resampling, then each tile's resize and crop), padding marked ignore: what every
tile of the tower sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Int, Shaped
from torch import Tensor
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import PILImageResampling
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches, unpad_image

from ..images.preprocess import ImageGeometry, MaskInput


@dataclass(frozen=True)
class AnyresTiling:
    """Where one image's tiles and features sit, in the processor's and the model's own arithmetic."""

    size: tuple[int, int]  # original (height, width)
    best: tuple[int, int]  # the grid resolution chosen for it (height, width)
    resized: tuple[int, int]  # the image inside it, aspect kept (height, width)
    n_tiles: int  # tower inputs: base image + tiles
    tile_grid: tuple[int, int]  # tiles down, across
    kept: Int[Tensor, "rows cols"]  # full-grid feature index of each feature left after unpadding

    @property
    def n_tokens(self) -> int:
        rows, cols = self.kept.shape
        return rows * (cols + 1)  # plus the base grid, counted by the caller


def anyres_tiling(size: tuple[int, int], pinpoints: list, tile: int, patch: int) -> AnyresTiling:
    """Geometry of one image of (height, width) `size` for tiles of `tile` pixels and `patch`-pixel patches."""
    height, width = size
    best = tuple(select_best_resolution((height, width), pinpoints))
    resized = tuple(get_patch_output_size(np.empty((1, height, width), dtype=np.uint8), best, "channels_first"))
    tile_grid = (best[0] // tile, best[1] // tile)
    g = tile // patch
    full = torch.arange(tile_grid[0] * g * tile_grid[1] * g).view(1, tile_grid[0] * g, tile_grid[1] * g)
    kept = unpad_image(full, [height, width])[0]  # the model's own unpadding, on feature indices
    n_tiles = image_size_to_num_patches([height, width], pinpoints, tile)
    return AnyresTiling((height, width), best, resized, n_tiles, tile_grid, kept)


def edges_back(features: Int[Tensor, "n"], patch: int, pad: int, resized: int, original: int) -> Int[Tensor, "n_plus_1"]:
    """Pixel edges in the original image of consecutive feature rows (or columns) `features` of a
    canvas where the image, resized from `original` to `resized` pixels, sits at offset `pad`; a
    feature covers `patch` canvas pixels. A canvas pixel i comes from original pixel
    floor((i + 0.5) * original / resized) (nearest-neighbour centres), so each edge is the source of
    a feature's first pixel and a box holds every pixel its feature was resized from. The outer
    edges are the image's own: what the model kept over padding, or cut of the image, falls to the
    first and last cell."""
    starts = (torch.cat([features, features[-1:] + 1]) * patch - pad).clamp(0, resized)
    edges = torch.div((2 * starts + 1) * original, 2 * resized, rounding_mode="floor").clamp(max=original)
    edges[0], edges[-1] = 0, original
    return edges


def patch_px(geo: AnyresTiling, g: int) -> int:
    """Pixels of a tile per feature."""
    return geo.best[0] // (geo.tile_grid[0] * g)


def is_anyres(image_processor: Any) -> bool:
    """Whether the processor tiles images at any resolution (it has grid resolutions)."""
    image_processor = getattr(image_processor, "image_processor", image_processor)
    return getattr(image_processor, "image_grid_pinpoints", None) is not None


def geometry_for(processor: Any) -> "ImageGeometry | AnyresGeometry":
    """The mask geometry of `processor`: anyres tiling, or the stock resize / pad / crop when the
    processor has no grid resolutions."""
    return AnyresGeometry(processor) if is_anyres(processor) else ImageGeometry.from_processor(processor)


class AnyresGeometry:
    """Mask geometry of an anyres image processor (see the module docstring)."""

    image_size = staticmethod(ImageGeometry.image_size)

    def __init__(self, processor: Any) -> None:
        self.processor = getattr(processor, "image_processor", processor)
        if not hasattr(self.processor, "get_image_patches"):
            raise ValueError(f"{type(self.processor).__name__} has grid resolutions but no get_image_patches; "
                             "only PIL-backed anyres processors (LlavaNextImageProcessorPil) are replayed")
        # the base image's size and the tile size, decided as the processor's `_preprocess` does
        size, crop = self.processor.size, self.processor.crop_size
        self.base = (size.height, size.width) if size.height and size.width else (size.shortest_edge,) * 2
        self.tile = crop.height if crop and crop.height else size.height or size.shortest_edge

    def transform_mask(self, mask: MaskInput, ignore_index: int = 255) -> Shaped[np.ndarray, "H W"]:
        """The mask in the layout's canvas, the original image: unchanged (validated, copied)."""
        return np.array(ImageGeometry._mask_to_array(mask))

    def tile_masks(self, mask: MaskInput, ignore_index: int = 255) -> Shaped[np.ndarray, "n_tiles tile tile"]:
        """Every tile the tower sees (base image first), as label masks; padding is `ignore_index`."""
        array = ImageGeometry._mask_to_array(mask)
        values, codes = np.unique(array, return_inverse=True)
        if len(values) > 255:
            raise ValueError(f"a mask with {len(values)} distinct labels; tiling handles at most 255")
        coded = (codes.reshape(array.shape) + 1).astype(np.uint8)  # 0 is left for the processor's padding
        p = self.processor
        tiles = p.get_image_patches(coded[None], p.image_grid_pinpoints, size=self.base, patch_size=self.tile,
                                    resample=PILImageResampling.NEAREST)
        out = []
        for tile in tiles:
            if p.do_resize:
                tile = p.resize(image=tile, size=p.size, resample=PILImageResampling.NEAREST)
            if p.do_center_crop:
                tile = p.center_crop(image=tile, size=p.crop_size)
            out.append(np.asarray(tile)[0])
        stacked = np.stack(out).astype(np.int64)
        lookup = np.concatenate([[ignore_index], values.astype(np.int64)])
        return lookup[stacked]

