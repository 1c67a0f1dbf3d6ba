"""The preprocessed image as the model sees it, for figures that paint maps over the picture.

The processor's normalisation is undone so a map lines up with what the tower read (its resize,
crop and tile), not with the original file; a tiled image shows its base tile, the whole image.
"""

from __future__ import annotations

import numpy as np
import torch


def picture_as_seen(model, pixels: torch.Tensor) -> np.ndarray:
    """The preprocessed image as the model sees it (normalisation undone), [h, w, 3] uint8 (for a
    tiled image, its base tile: the whole image at the tower's size)."""
    processor = getattr(model.processor, "image_processor", None)
    mean = torch.tensor(getattr(processor, "image_mean", (0.0, 0.0, 0.0)))[:, None, None]
    std = torch.tensor(getattr(processor, "image_std", (1.0, 1.0, 1.0)))[:, None, None]
    if pixels.ndim == 4:  # tiles of one image (anyres): the first is the whole image, squashed
        pixels = pixels[0]
    image = (pixels.float().cpu() * std + mean).clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
