"""How a tiled image becomes LLM tokens when each tile's run of placeholders is marked by text of its own.

Aya Vision's processor writes an image as `<|START_OF_IMG|>`, then for each tile `TILE_i` (ordinary
text, one or several tokens depending on the tokenizer) and the tile's run of `<|IMG_PATCH|>`, then
`TILE_GLOBAL` and the thumbnail's run, then `<|END_OF_IMG|>`; Cohere2-Vision's writes each run
followed by `<|IMG_LINE_BREAK|>`. Either way an image is its start marker, runs of one frame each
(the tiles in raster order, the thumbnail last) with marker tokens between or after them, and its end
marker. The runs are found between the markers whatever the markers' tokenisation; the tile grid
comes from the image's size (GotOcr2's tiling, replayed), and the tiles and thumbnail are laid on the
original image as Llama 4's layout lays its tiles and global image. Markers are special tokens
outside every grid and outside the image's attention block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ....errors import LayoutMismatchError
from ...images.layout import ImageSpan
from ..llama4.layout import FrameSizes, _global_image, _tile_grid

START, END = "start", "end"


def frame_runs(ids: Tensor, start: int, end_id: int, image_id: int) -> tuple[list[Tensor], int]:
    """The runs of `image_id` after the start marker at `start`, up to the first `end_id`: each run's
    positions, and the end marker's position (refused when the row ends first)."""
    after = ids[start + 1:]
    ends = (after == end_id).nonzero().flatten()
    if not len(ends):
        raise LayoutMismatchError(f"an image's start marker at position {start} has no end marker after it")
    end = start + 1 + int(ends[0])
    inside = start + 1 + (ids[start + 1:end] == image_id).nonzero().flatten()
    if not len(inside):
        return [], end
    breaks = (inside[1:] - inside[:-1] != 1).nonzero().flatten() + 1
    return list(torch.tensor_split(inside, breaks.tolist())), end


def marked_tiles_span(row: int, image: int, start: int, ids: Tensor, size: tuple[int, int], grid: tuple[int, int],
                      frame: int, sizes: FrameSizes, markers: dict[str, int], image_id: int,
                      marker_kind: str) -> ImageSpan:
    """Image `image` of batch row `row`, whose start marker is at `start`: its `grid` of tiles (and a
    thumbnail beside several), each a run of `sizes.n` placeholders; what lies between the markers
    and is not a placeholder is `marker_kind`. Refuses runs that are not the processor's for `size`."""
    runs, end = frame_runs(ids, start, markers[END], image_id)
    tiles = grid[0] * grid[1]
    frames = tiles + (tiles > 1)
    if len(runs) != frames or any(len(run) != sizes.n for run in runs):
        raise LayoutMismatchError(
            f"batch row {row}: image {image} of size {size} is {grid[0]} x {grid[1]} tiles"
            f"{' + a thumbnail' if tiles > 1 else ''}, {frames} runs of {sizes.n} image tokens; between its markers at "
            f"{start} and {end} there are {len(runs)} runs of {[len(r) for r in runs]}. Were the prompts expanded "
            "by this model's processor, with its default tiling?")
    content = (grid[0] * sizes.tile, grid[1] * sizes.tile)  # the image is resized to fill its tiles
    segments = [_tile_grid(grid[0], grid[1], content, size, torch.stack([run[0] for run in runs[:tiles]]), frame, sizes)]
    if tiles > 1:
        segments.append(_global_image(size, runs[-1], frame + tiles, sizes))
    between = torch.ones(end - start - 1, dtype=torch.bool)
    between[torch.cat(runs) - start - 1] = False
    special = {START: torch.tensor([start]), marker_kind: start + 1 + between.nonzero().flatten(), END: torch.tensor([end])}
    return ImageSpan(row, image, tuple(segments), size, special)
