"""How Llama 4's images become LLM tokens: tiles and a global image, with separators between them.

`Llama4Processor` writes each image as `<|image_start|>`, then, when the image has several tiles,
each tile's `<|patch|>` run in raster order with `<|tile_x_separator|>` between the tiles of a row and
`<|tile_y_separator|>` after each row, then `<|image|>` and the global image's run (the whole image
squashed to one tile), then `<|image_end|>`; an image of one tile is `<|image_start|><|image|>`, its
run and `<|image_end|>`, that run being the padded tile itself. Each run is one frame of
`pixel_values` (tiles first, the global image last), folded 2x2 by the pixel shuffle. The tokens do
not say the image's size, which places the tiles on it (the resized image fills the tile canvas only
up to its own size), so the layout takes each image's original size (`image_sizes`, layout-only) and
lays the joined tile grid and the global image on the original image, as InternVL's layout does;
tokens over padding alone get empty boxes. Separators, start, end and the global tag are special
tokens outside every grid and outside the image's attention block.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ....errors import LayoutMismatchError
from ...images.layout import GridCells, ImageSpan, Segment
from ..internvl.geometry import edges_on_original
from ..pixel_shuffle import shuffle_map
from .geometry import plan_tiles

START, END, GLOBAL_TAG, TILE_SEPARATOR, ROW_BREAK = "start", "end", "global_tag", "tile_separator", "row_break"
PATCH = "patch"


class FrameSizes(NamedTuple):
    """One frame's sizes: `tile` pixels a side, `patch` pixels a patch, `side` patches a side,
    `k` tokens a side after the shuffle (`shuffle` tokens fold into one), `n` = k * k tokens."""

    tile: int
    patch: int
    side: int
    k: int
    shuffle: int

    @property
    def n(self) -> int:
        return self.k * self.k


def expected_tokens(rows: int, cols: int, n: int) -> list[str]:
    """The kinds of an image's tokens, in prompt order, as `Llama4Processor._prompt_split_image` writes them."""
    tokens = [START]
    if rows * cols > 1:
        for _ in range(rows):
            for c in range(cols):
                tokens += [PATCH] * n + ([TILE_SEPARATOR] if c < cols - 1 else [])
            tokens.append(ROW_BREAK)
    return tokens + [GLOBAL_TAG] + [PATCH] * n + [END]


def image_span(row: int, image: int, start: int, ids: Tensor, size: tuple[int, int], frame: int, sizes: FrameSizes,
               token_ids: dict[str, int], max_tiles: int) -> tuple[ImageSpan, int]:
    """Image `image` of batch row `row`, whose `<|image_start|>` is at `start`: its span and the
    number of frames it takes. Refuses tokens that are not the processor's expansion for its size."""
    plan = plan_tiles(size, sizes.tile, max_tiles)
    kinds = expected_tokens(plan.rows, plan.cols, sizes.n)
    found = ids[start:start + len(kinds)].tolist()
    if found != [token_ids[kind] for kind in kinds]:
        raise LayoutMismatchError(
            f"batch row {row}: image {image} of size {size} is {plan.rows} x {plan.cols} tiles"
            f"{' + a global image' if plan.rows * plan.cols > 1 else ''} ({len(kinds)} tokens from <|image_start|> at "
            f"{start}), which the prompt's tokens there do not match; were the prompts expanded by this model's processor "
            "with its tile size and max_patches?")
    positions = start + torch.arange(len(kinds))
    kind_of = dict(enumerate(kinds))
    runs = [positions[i:i + sizes.n] for i in range(len(kinds)) if kind_of[i] == PATCH and kind_of.get(i - 1) != PATCH]
    tiles = plan.rows * plan.cols
    segments = [_tile_grid(plan.rows, plan.cols, plan.content, size, torch.stack(runs[:tiles])[:, 0], frame, sizes)]
    if tiles > 1:
        segments.append(_global_image(size, runs[-1], frame + tiles, sizes))
    special = {kind: positions[[i for i, k in kind_of.items() if k == kind]] for kind in
               (START, TILE_SEPARATOR, ROW_BREAK, GLOBAL_TAG, END) if kind in kinds}
    return ImageSpan(row, image, tuple(segments), size, special), tiles + (tiles > 1)


def _tile_grid(rows: int, cols: int, content: tuple[int, int], size: tuple[int, int], starts: Tensor, frame: int,
               sizes: FrameSizes) -> Segment:
    """The tiles as one joined grid (token (R, C) is token (R % k, C % k) of tile (R // k, C // k)),
    laid on the original image through the resize to `content` (cells past it cover padding only)."""
    k, g, shuffle = sizes.k, sizes.side, shuffle_map(sizes.side, sizes.shuffle)
    (height, width), (content_h, content_w) = size, content
    tokens = GridCells(edges_on_original(rows * k, sizes.tile // k, content_h, height),
                       edges_on_original(cols * k, sizes.tile // k, content_w, width))
    patches = GridCells(edges_on_original(rows * g, sizes.patch, content_h, height),
                        edges_on_original(cols * g, sizes.patch, content_w, width))
    tr, tc = tokens.cells[:, 0], tokens.cells[:, 1]
    which = (tr // k) * cols + tc // k  # the tile of each token of the joined grid
    within = (tr % k) * k + tc % k
    pr, pc = patches.cells[:, 0], patches.cells[:, 1]
    patch_tile = (pr // g) * cols + pc // g
    patch_within = (pr % g) * g + pc % g
    fed = shuffle[patch_within]  # the token of its own tile each patch feeds
    joined = ((patch_tile // cols) * k + fed // k) * (cols * k) + (patch_tile % cols) * k + fed % k
    # the tower's CLS token comes after the patches, so a patch's vision position is its index
    return Segment("tiles", tokens, starts[which] + within, (frame + which, within),
                   patches, (frame + patch_tile, patch_within), joined)


def _global_image(size: tuple[int, int], positions: Tensor, frame: int, sizes: FrameSizes) -> Segment:
    """The whole image squashed to one tile, laid back on the original image."""
    k, g, tile = sizes.k, sizes.side, sizes.tile
    height, width = size
    tokens = GridCells(edges_on_original(k, tile // k, tile, height), edges_on_original(k, tile // k, tile, width))
    patches = GridCells(edges_on_original(g, sizes.patch, tile, height), edges_on_original(g, sizes.patch, tile, width))
    local_tokens, local_patches = torch.arange(sizes.n), torch.arange(g * g)
    return Segment("global", tokens, positions, (torch.full((sizes.n,), frame), local_tokens),
                   patches, (torch.full((g * g,), frame), local_patches), shuffle_map(g, sizes.shuffle))
