"""Where Mllama's images are: tiles of a canvas, read by the LLM as cross-attention keys.

The processor fits each image into a canvas of `rows x cols` tiles (its aspect ratio id names the
grid among `supported_aspect_ratios`), padding below and to the right, and cuts the canvas into
tiles in raster order. Every image slot of a row has `max_num_tiles` tiles of `1 + patches` tokens
(CLS first) in the vision activations, the adapter's output and the cross-attention keys; padded
tiles and empty slots are there but never read (the cross-attention mask closes them), so each
image's segments are its real tiles only, one `"tile"` segment each, with cells on the canvas.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from ....errors import LayoutMismatchError
from ...images.layout import CrossAttendedLayout, ImageSpan, Segment
from ...images.pixel_map import GridCells


def tile_grid(aspect_ratio_id: int, aspect_ratios: list[list[int]]) -> tuple[int, int]:
    """(rows, cols) of tiles an aspect ratio id names (ids count from 1; 0 is an empty slot)."""
    if not 1 <= aspect_ratio_id <= len(aspect_ratios):
        raise LayoutMismatchError(f"aspect ratio id {aspect_ratio_id} is not one of this model's "
                                  f"1..{len(aspect_ratios)}; were the images preprocessed by its own processor?")
    rows, cols = aspect_ratios[aspect_ratio_id - 1]
    return int(rows), int(cols)


def cross_attended_layout(
    input_ids: Int[Tensor, "batch seq"], aspect_ratio_ids: Int[Tensor, "batch slots"], *, image_token_id: int,
    tile: int, patch: int, max_tiles: int, aspect_ratios: list[list[int]],
) -> CrossAttendedLayout:
    """The layout of a batch: per row, one span per `<|image|>` placeholder (the slot of the same
    rank), numbered in row-major order; vision activations are [row * slots, tiles * padded tile, d]
    (each tile padded to a multiple of 8 tokens), the adapter's output [row, slot, tile, 1 + patches]."""
    batch, slots = aspect_ratio_ids.shape
    side = tile // patch
    per_tile = side * side + 1
    padded = per_tile + (8 - per_tile % 8) % 8
    patch_ids = torch.arange(1, per_tile)
    rows_out, image_index = [], 0
    for b in range(batch):
        n_images = int((input_ids[b] == image_token_id).sum())
        used = int((aspect_ratio_ids[b] > 0).sum())
        if n_images != used:
            raise LayoutMismatchError(f"batch row {b} has {n_images} <|image|> placeholder(s) but {used} image(s) "
                                      "in aspect_ratio_ids; prompts and images must match")
        spans = []
        for slot in range(n_images):
            grid_rows, grid_cols = tile_grid(int(aspect_ratio_ids[b, slot]), aspect_ratios)
            segments, cls = [], []
            for t in range(grid_rows * grid_cols):
                top, left = (t // grid_cols) * tile, (t % grid_cols) * tile
                cells = GridCells.uniform(side, side, tile, tile, top=top, left=left)
                key_start = (slot * max_tiles + t) * per_tile
                cls.append(key_start)
                segments.append(Segment(
                    "tile", cells, key_start + patch_ids,
                    (torch.full_like(patch_ids, b), torch.full_like(patch_ids, slot), torch.full_like(patch_ids, t),
                     patch_ids),
                    cells, (torch.full_like(patch_ids, b * slots + slot), t * padded + patch_ids),
                    torch.arange(side * side),
                ))
            spans.append(ImageSpan(b, image_index, tuple(segments), (grid_rows * tile, grid_cols * tile),
                                   {"cls": torch.tensor(cls)}))
            image_index += 1
        rows_out.append(tuple(spans))
    return CrossAttendedLayout(images=tuple(rows_out), seq_len=slots * max_tiles * per_tile,
                               vision_shape=(batch * slots, max_tiles * padded),
                               adapter_shape=(batch, slots, max_tiles, per_tile))
