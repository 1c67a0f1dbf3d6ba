"""Where Mistral 3's image tokens and vision patches are: one grid per image, rows split by breaks.

Image i of `image_sizes[i]` = (H, W) pixels is h x w = (H / p) x (W / p) patches and
(h / m) x (w / m) LLM tokens (m = 2, the merge size). In `input_ids` its tokens come row by row:
each row's `[IMG]` tokens, then `[IMG_BREAK]`, the last row's break being `[IMG_END]` (recorded as
special tokens "row_break" and "end", outside the grid and outside the image's attention block),
so an image is not one contiguous run. The Pixtral tower packs every image's patches, each image
in raster order, into one sequence `[1, n_patches, d]`; the merger turns each 2x2 group into one
token, `[1, n_tokens, d]` in the LLM's order. Both stages are one packed sequence with a leading
dimension of one (`PackedLayout`: index tensors (0, k)). The canvas is the image as resized,
before the batch's zero padding.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from ....errors import LayoutMismatchError
from ...images.layout import GridCells, ImageSpan, PackedLayout, Segment, image_runs

ROW_BREAK, END = "row_break", "end"


def merged_token(h: int, w: int, merge: int) -> Int[Tensor, "h_times_w"]:
    """For each patch of an h x w grid in raster order, the LLM token (raster over the
    (h // merge) x (w // merge) token grid) its merge group makes, or -1 for a patch past the last
    whole group (the merger's `unfold` drops it)."""
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    token = (r // merge) * (w // merge) + c // merge
    inside = (r < h // merge * merge) & (c < w // merge * merge)
    return torch.where(inside, token, torch.full_like(token, -1)).flatten()


def mistral3_layout(
    input_ids: Int[Tensor, "batch seq"],
    image_sizes: Int[Tensor, "n_images 2"] | None,
    *,
    image_token_id: int,
    patch_size: int,
    merge: int,
    break_token_id: int | None = None,
    end_token_id: int | None = None,
    row_breaks: bool = True,
) -> PackedLayout:
    """The layout of a batch. The ids of `[IMG_BREAK]` / `[IMG_END]`, when given (from the
    processor), are checked at the token after each row; without them any single token there is
    taken as the row's break. Without `row_breaks` (LightOnOCR's prompts) an image's tokens are one
    contiguous run, row after row."""
    runs = image_runs(input_ids, image_token_id)
    sizes = [] if image_sizes is None else [(int(h) // patch_size, int(w) // patch_size) for h, w in image_sizes.tolist()]
    counts = [(h // merge) * (w // merge) for h, w in sizes]
    if sum(len(r) for r in runs) != sum(counts):
        raise LayoutMismatchError(
            f"input_ids hold {sum(len(r) for r in runs)} image tokens but image_sizes make {sum(counts)} "
            f"({len(sizes)} image(s)); were the prompts expanded by this model's processor?"
        )
    rows: list[tuple[ImageSpan, ...]] = []
    image, patch_offset, token_offset = 0, 0, 0
    for b, where in enumerate(runs):
        spans, taken = [], 0
        while taken < len(where):
            (h, w), n = sizes[image], counts[image]
            th, tw = h // merge, w // merge
            block = where[taken : taken + n]
            if len(block) < n:
                raise LayoutMismatchError(f"batch row {b}: image {image} needs {n} image tokens, the row has {len(block)} left")
            grid = block.view(th, tw)
            if not row_breaks:
                if (block.diff() != 1).any():
                    raise LayoutMismatchError(f"batch row {b}: the {n} tokens of image {image} are not one contiguous run")
                special = {}
            else:
                special = _row_breaks(input_ids[b], grid, f"batch row {b}: image {image}", break_token_id, end_token_id)
            height, width = h * patch_size, w * patch_size
            segment = Segment(
                "grid", GridCells.uniform(th, tw, th * merge * patch_size, tw * merge * patch_size), block.clone(),
                (torch.zeros(n, dtype=torch.long), torch.arange(token_offset, token_offset + n)),
                GridCells.uniform(h, w, height, width),
                (torch.zeros(h * w, dtype=torch.long), torch.arange(patch_offset, patch_offset + h * w)),
                patch_to_token=merged_token(h, w, merge),
            )
            spans.append(ImageSpan(b, image, (segment,), (height, width), special))
            image, taken = image + 1, taken + n
            patch_offset, token_offset = patch_offset + h * w, token_offset + n
        rows.append(tuple(spans))
    return PackedLayout(images=tuple(rows), seq_len=input_ids.shape[1],
                        vision_shape=(1, patch_offset), adapter_shape=(1, token_offset))


def _row_breaks(
    ids: Int[Tensor, "seq"], grid: Int[Tensor, "rows cols"], where: str, break_token_id: int | None,
    end_token_id: int | None,
) -> dict[str, Tensor]:
    """The positions of an image's `[IMG_BREAK]`s and its `[IMG_END]`, checked: one token after each
    row of `grid` (positions), those of the processor's ids when given."""
    rows, cols = grid.shape
    if (grid[:, -1] - grid[:, 0] != cols - 1).any() or (grid[1:, 0] - grid[:-1, -1] != 2).any():
        raise LayoutMismatchError(f"{where}: its {grid.numel()} tokens are not {rows} rows of {cols} with one break after each")
    after = grid[:, -1] + 1  # the break after each row, the end after the last
    if after[-1] >= ids.shape[0]:
        raise LayoutMismatchError(f"{where} has no [IMG_END] after its last row")
    for kind, positions, token in ((ROW_BREAK, after[:-1], break_token_id), (END, after[-1:], end_token_id)):
        if token is not None and (ids[positions] != token).any():
            raise LayoutMismatchError(f"{where}: its rows are not followed by its {kind} token")
    return {ROW_BREAK: after[:-1].clone(), END: after[-1:].clone()}
