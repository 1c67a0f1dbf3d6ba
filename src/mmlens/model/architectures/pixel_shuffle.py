"""The pixel shuffle (Idefics3 / SmolVLM, InternVL): each r x r square of patches folded into one token.

The connector stacks a square's patches along the channels, so a tile of `side x side` patches
becomes `side/r x side/r` tokens; `shuffle_map` says which token each patch feeds, the layout's
`Segment.patch_to_token` for every family that shuffles.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor


def shuffle_map(side: int, r: int) -> Int[Tensor, "n_patches"]:
    """Token (raster index in a `side/r` grid) each patch of a `side x side` tile feeds after
    the connector's pixel shuffle: patch (y, x) lands in token (y // r, x // r) (its
    `pixel_shuffle` stacks the r x r patches of a square along the channels)."""
    y, x = torch.div(torch.arange(side * side), side, rounding_mode="floor"), torch.arange(side * side) % side
    return (y // r) * (side // r) + x // r
