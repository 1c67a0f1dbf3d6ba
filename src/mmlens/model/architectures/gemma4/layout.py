"""Where Gemma 4's image tokens and vision patches are: one grid per image, its size from the image.

Image i is resized, keeping its aspect ratio, to h x w patches (`image_position_ids[i]` holds each
real patch's (x, y), raster order, then (-1, -1) for the padding patches), pooled k x k into
(h / k) x (w / k) soft tokens in raster order. In `input_ids` those tokens are one run between
`<start_of_image>` and `<end_of_image>` (the specials "start" and "end", outside the grid and the
image's attention block). The vision activations keep one row per image `[n_images, max_patches]`;
the adapter's are the images' tokens one after the other `[n_tokens]` (the tower strips the padding).
The canvas is the image as resized.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from ....errors import LayoutMismatchError
from ...images.layout import GridCells, ImageSpan, ImageTokenLayout, Segment, image_runs


def patch_grids(image_position_ids: Int[Tensor, "n_images max_patches 2"]) -> list[tuple[int, int]]:
    """Each image's (rows, cols) of real patches, read off its positions."""
    grids = []
    for positions in image_position_ids:
        real = positions[(positions != -1).all(-1)]
        grids.append((int(real[:, 1].max()) + 1, int(real[:, 0].max()) + 1) if len(real) else (0, 0))
    return grids


def pooled_token(h: int, w: int, k: int) -> Int[Tensor, "h_times_w"]:
    """For each patch of an h x w grid in raster order, the soft token (raster over the
    (h / k) x (w / k) grid) whose k x k window holds it: Hugging Face's `_avg_pool_by_positions`."""
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ((r // k) * (w // k) + c // k).flatten()


def gemma4_layout(
    input_ids: Int[Tensor, "batch seq"],
    image_position_ids: Int[Tensor, "n_images max_patches 2"] | None,
    *,
    image_token_id: int,
    markers: dict[str, int],
    patch_size: int,
    pooling: int,
) -> ImageTokenLayout:
    """The layout of a batch; `markers` are the ids of the "start" and "end" tokens around each image."""
    runs = image_runs(input_ids, image_token_id)
    grids = [] if image_position_ids is None else patch_grids(image_position_ids.cpu())
    counts = [(h // pooling) * (w // pooling) for h, w in grids]
    if sum(len(r) for r in runs) != sum(counts):
        raise LayoutMismatchError(
            f"input_ids hold {sum(len(r) for r in runs)} image tokens but image_position_ids make {sum(counts)} "
            f"({len(grids)} image(s)); were the prompts expanded by Gemma 4's processor?"
        )
    rows: list[tuple[ImageSpan, ...]] = []
    image, token_offset = 0, 0
    for b, where in enumerate(runs):
        spans, taken = [], 0
        while taken < len(where):
            (h, w), n = grids[image], counts[image]
            block = where[taken : taken + n]
            if len(block) < n or int(block[-1] - block[0]) != n - 1:
                raise LayoutMismatchError(f"batch row {b}: image {image}'s {n} tokens are not one run of the row")
            around = {"start": block[:1] - 1, "end": block[-1:] + 1}
            for kind, position in around.items():
                if not 0 <= int(position) < input_ids.shape[1] or int(input_ids[b, position]) != markers[kind]:
                    raise LayoutMismatchError(
                        f"batch row {b}: image {image} has no <{kind}_of_image> token next to its grid; Gemma 4 "
                        "prompts must be expanded by its processor (Gemma4Processor or Gemma4ImageProcessor)"
                    )
            th, tw = h // pooling, w // pooling
            segment = Segment(
                "grid", GridCells.uniform(th, tw, h * patch_size, w * patch_size), block.clone(),
                (torch.arange(token_offset, token_offset + n),),
                GridCells.uniform(h, w, h * patch_size, w * patch_size),
                (torch.full((h * w,), image), torch.arange(h * w)),
                patch_to_token=pooled_token(h, w, pooling),
            )
            spans.append(ImageSpan(b, image, (segment,), (h * patch_size, w * patch_size), around))
            image, taken, token_offset = image + 1, taken + n, token_offset + n
        rows.append(tuple(spans))
    if image != len(grids):
        raise LayoutMismatchError(f"{len(grids)} images given but the prompts hold {image}")
    max_patches = 0 if image_position_ids is None else image_position_ids.shape[1]
    return ImageTokenLayout(images=tuple(rows), seq_len=input_ids.shape[1],
                            vision_shape=(len(grids), max_patches), adapter_shape=(token_offset,))
