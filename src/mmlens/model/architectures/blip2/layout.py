"""Where BLIP-2's images sit: a run of `num_query_tokens` placeholders per image, the Q-Former's
learned queries (`LearnedQueryLayout`: no pixel grid), and behind them the tower's patch grid."""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from ....errors import LayoutMismatchError
from ...images.layout import LEARNED_QUERY_KIND, ImageSpan, LearnedQueryLayout, Segment, image_runs
from ...images.pixel_map import GridCells, TokenGrid

_NO_CELLS = GridCells(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
_EMPTY = torch.zeros(0, dtype=torch.long)


def learned_query_layout(input_ids: Int[Tensor, "batch seq"], *, image_token_id: int, n_queries: int,
                         image_size: int, patch_grid: tuple[int, int]) -> LearnedQueryLayout:
    """Each run of `n_queries` placeholders is one image's queries (images in row-major batch
    order, the order of `pixel_values`); its vision activation is [n_images, 1 + patches] (CLS first)
    and the adapter's output [n_images, n_queries]."""
    patches = TokenGrid(*patch_grid, image_size=(image_size, image_size))
    n_patches = len(patches)
    rows, image_index = [], 0
    for b, where in enumerate(image_runs(input_ids, image_token_id)):
        if len(where) % n_queries:
            raise LayoutMismatchError(f"batch row {b} has {len(where)} image tokens, not a multiple of the {n_queries} "
                                      "learned queries one image takes; were the prompts expanded by this model's processor?")
        spans = []
        for start in range(0, len(where), n_queries):
            block = where[start:start + n_queries]
            if block[-1] - block[0] != n_queries - 1:
                raise LayoutMismatchError(f"batch row {b}: the image tokens at positions {block[0].item()}..."
                                          f"{block[-1].item()} are not contiguous")
            segment = Segment("patches", _NO_CELLS, _EMPTY, (_EMPTY, _EMPTY), patches.cells_grid,
                              (torch.full((n_patches,), image_index), torch.arange(n_patches) + 1),
                              torch.full((n_patches,), -1))
            spans.append(ImageSpan(b, image_index, (segment,), (image_size, image_size), {LEARNED_QUERY_KIND: block.clone()}))
            image_index += 1
        rows.append(tuple(spans))
    return LearnedQueryLayout(images=tuple(rows), seq_len=input_ids.shape[1], vision_shape=(image_index, 1 + n_patches),
                              adapter_shape=(image_index, n_queries))
