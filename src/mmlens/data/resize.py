"""Bring an image and its mask to one square size with the same geometry.

A vision encoder sees a square; if the dataset already stores squares, every processor maps
pixel (x, y) of the mask to the same place in its input, so token labels need no knowledge of
the processor. "crop" takes the centred square (CLIP/LLaVA preprocessing: shortest side, centre
crop), "squash" keeps the whole frame at a distorted aspect ratio. Images are resampled
bicubically, masks with nearest neighbour so no label is ever blended into a new one.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from ..errors import InputError

ResizeMode = Literal["crop", "squash"]
RESIZE_MODES = ("crop", "squash")
from ..defaults import MIN_IMAGE_SIZE  # noqa: E402,F401  (re-exported)

# EXIF orientations 5-8 rotate by 90 degrees, which swaps the decoded width and height.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


def decoded_size(path: str) -> tuple[int, int]:
    """(width, height) of an image as ``datasets`` will decode it. The pixels are decoded once
    here, though only the header holds the size: a truncated file decodes lazily otherwise, and
    would fail mid-study, at whichever batch first reads it."""
    with Image.open(path) as image:
        image.load()
        width, height = image.size
        orientation = image.getexif().get(Image.ExifTags.Base.Orientation)
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


def load_rgb(path: str) -> Image.Image:
    """Decode an image the way ``datasets.Image(mode="RGB")`` does (EXIF-upright, RGB)."""
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")


def to_square(
    image: Image.Image, mask: np.ndarray, size: int, mode: ResizeMode = "crop"
) -> tuple[np.ndarray, np.ndarray]:
    """Resize ``image`` (RGB) and ``mask`` (HxW uint8) to ``size`` x ``size``."""
    if mode not in RESIZE_MODES:
        raise InputError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")
    height, width = mask.shape
    if image.size != (width, height):
        raise InputError(f"image is {image.size[0]}x{image.size[1]} but mask is {width}x{height}")
    mask_image = Image.fromarray(mask)
    if mode == "crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
        image, mask_image = image.crop(box), mask_image.crop(box)
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    mask_image = mask_image.resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(image, dtype=np.uint8), np.asarray(mask_image, dtype=np.uint8)
