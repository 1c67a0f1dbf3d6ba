"""Label masks through an Idefics3 / SmolVLM image processor: its resize, then its tiles.

That processor resizes an image twice (longest edge to `size`, then both sides up to multiples of
the tile size) and cuts tiles from the result, plus a squashed global copy. Its layout puts pixel
boxes on that resized image (the processed canvas: the tiles are exact crops of it), so
`transform_mask` replays the processor's own two resizes on the mask, nearest-neighbour, with the
processor's own size arithmetic.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jaxtyping import Shaped
from transformers.image_utils import PILImageResampling, SizeDict

from ...images.preprocess import ImageGeometry, MaskInput


class SplitGeometry:
    """Mask geometry of an Idefics3-style image processor (see the module docstring)."""

    image_size = staticmethod(ImageGeometry.image_size)

    def __init__(self, processor: Any) -> None:
        self.processor = getattr(processor, "image_processor", processor)
        if not hasattr(self.processor, "pad"):  # the PIL backend; the torchvision one resizes tensors
            raise ValueError(f"{type(self.processor).__name__}: only PIL-backed Idefics3 processors are replayed")

    def transform_mask(self, mask: MaskInput, ignore_index: int = 255) -> Shaped[np.ndarray, "H W"]:
        """The mask on the processed canvas (the resized image the tiles are cut from)."""
        array = ImageGeometry._mask_to_array(mask)
        values, codes = np.unique(array, return_inverse=True)
        if len(values) > 256:
            raise ValueError(f"a mask with {len(values)} distinct labels; resizing handles at most 256")
        coded = codes.reshape(array.shape).astype(np.uint8)[None]  # CHW, one channel
        p, nearest = self.processor, PILImageResampling.NEAREST
        tile = p.max_image_size["longest_edge"]
        if p.do_resize:
            size = p.size if isinstance(p.size, SizeDict) else SizeDict(**p.size)
            coded = p.resize(coded, size, resample=nearest)
        if p.do_image_splitting:
            coded = p.resize_for_vision_encoder(coded, tile, resample=nearest)
        else:
            coded = p.resize(coded, SizeDict(height=tile, width=tile), resample=nearest)
        return values.astype(np.int64)[np.asarray(coded)[0]]
