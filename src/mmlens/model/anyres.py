"""Label masks through an "anyres" processor (LLaVA-NeXT and its kin): tiles of the original image.

Such a processor resizes each image into its best grid resolution (aspect kept, the rest padded),
cuts tower-sized tiles from it and puts a squashed copy of the whole image first. A tiled family's
layout puts its pixel boxes on the ORIGINAL image (each token's box is where its tile pixels came
from), so `transform_mask` leaves a mask in the original pixels, and `tile_masks` sends a mask
through the processor's own tiling code (its `get_image_patches`, with nearest-neighbour resampling,
then each tile's resize and crop), padding marked ignore: what every tile of the tower sees.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jaxtyping import Shaped
from transformers.image_utils import PILImageResampling

from .preprocess import ImageGeometry, MaskInput


def is_anyres(image_processor: Any) -> bool:
    """Whether the processor tiles images at any resolution (it has grid resolutions)."""
    image_processor = getattr(image_processor, "image_processor", image_processor)
    return getattr(image_processor, "image_grid_pinpoints", None) is not None


def geometry_for(processor: Any) -> "ImageGeometry | AnyresGeometry":
    """The mask geometry of `processor`: anyres tiling or the stock resize / pad / crop (a family
    with its own geometry overrides `Architecture.mask_geometry` instead)."""
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

