"""Where Qwen2-VL's image tokens and vision patches are: one grid segment per image, its own size.

Image i of grid (1, h, w) patches is `(h / m) x (w / m)` LLM tokens (m = 2, the merge size), in
raster order between `<|vision_start|>` and `<|vision_end|>` (recorded as special tokens "start"
and "end", outside the grid). Its canvas is the image as the processor resized it, `h * patch` x
`w * patch` pixels. In the packed vision sequence its patches come 2x2 group by 2x2 group (the
processor's order), groups in raster order, and in Qwen2.5-VL the groups are then reordered window
by window over the whole batch; `vision_index` follows the tower's own order, so `gather("vision")`
returns patches in raster order over each image's patch grid, and patch (r, c) feeds LLM token
(r // m, c // m). The vision activation and the adapter's output are one packed sequence each, with
a leading dimension of one: `vision_shape = (1, n_patches)`, `adapter_shape = (1, n_tokens)`.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ....errors import LayoutMismatchError
from ...images.layout import GridCells, ImageSpan, PackedLayout, Segment, image_runs


def patch_order(h: int, w: int, merge: int) -> Int[Tensor, "h_times_w"]:
    """For each patch of an h x w grid in raster order, its index in the processor's flattening
    (2x2 group by 2x2 group, groups in raster order)."""
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    group = (r // merge) * (w // merge) + c // merge
    return (group * merge * merge + (r % merge) * merge + c % merge).flatten()


def unpatchify(
    patches: Float[Tensor, "n_patches patch_dim"], h: int, w: int, *, channels: int, temporal: int, patch_size: int,
    merge: int,
) -> Float[Tensor, "channels height width"]:
    """One image's rows of the processor's `pixel_values` (2x2 groups of flattened patches, each
    repeated over `temporal` frames) back into the [channels, h * patch, w * patch] picture."""
    p = patch_size
    x = patches.reshape(h // merge, w // merge, merge, merge, channels, temporal, p, p)[:, :, :, :, :, 0]
    return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, h * p, w * p)


def qwen_layout(
    input_ids: Int[Tensor, "batch seq"],
    grid_thw: Int[Tensor, "n_images 3"] | None,
    *,
    image_token_id: int,
    start_token_id: int,
    end_token_id: int,
    patch_size: int,
    merge: int,
    tower_group: Int[Tensor, "n_tokens"] | None,
) -> PackedLayout:
    """The layout of a batch; `tower_group[j]` is the index in the tower's sequence of the 2x2 group
    feeding LLM token j (all images, in order; None when the tower keeps that order)."""
    runs = image_runs(input_ids, image_token_id)
    grids = [] if grid_thw is None else [tuple(g) for g in grid_thw.tolist()]
    sizes = [t * h * w // merge**2 for t, h, w in grids]
    if sum(len(r) for r in runs) != sum(sizes):
        raise LayoutMismatchError(
            f"input_ids hold {sum(len(r) for r in runs)} image tokens but image_grid_thw makes {sum(sizes)} "
            f"({len(grids)} image(s)); were the prompts expanded by this model's processor?"
        )
    rows: list[tuple[ImageSpan, ...]] = []
    image, token_offset = 0, 0
    for b, where in enumerate(runs):
        spans, taken = [], 0
        while taken < len(where):
            t, h, w = grids[image]
            if t != 1:
                raise LayoutMismatchError(f"image {image} has {t} temporal patches; mmlens reads still images (t = 1)")
            n = sizes[image]
            block = where[taken : taken + n]
            if len(block) < n or block[-1] - block[0] != n - 1:
                raise LayoutMismatchError(f"batch row {b}: the {n} tokens of image {image} are not one contiguous run")
            groups = torch.arange(token_offset, token_offset + n)
            tower = groups if tower_group is None else tower_group[groups].cpu()
            raster = patch_order(h, w, merge)  # raster patch -> its slot among the image's patches
            group_of, within = raster // merge**2, raster % merge**2
            tokens = GridCells.uniform(h // merge, w // merge, h * patch_size, w * patch_size)
            patches = GridCells.uniform(h, w, h * patch_size, w * patch_size)
            segment = Segment(
                "grid", tokens, block.clone(), (torch.zeros(n, dtype=torch.long), groups),
                patches, (torch.zeros(h * w, dtype=torch.long), tower[group_of] * merge**2 + within),
                patch_to_token=group_of,
            )
            special = {}
            first, last = int(block[0]), int(block[-1])
            if first > 0 and int(input_ids[b, first - 1]) == start_token_id:
                special["start"] = torch.tensor([first - 1])
            if last + 1 < input_ids.shape[1] and int(input_ids[b, last + 1]) == end_token_id:
                special["end"] = torch.tensor([last + 1])
            spans.append(ImageSpan(b, image, (segment,), (h * patch_size, w * patch_size), special))
            image, taken, token_offset = image + 1, taken + n, token_offset + n
        rows.append(tuple(spans))
    return PackedLayout(
        images=tuple(rows), seq_len=input_ids.shape[1],
        vision_shape=(1, token_offset * merge**2), adapter_shape=(1, token_offset),
    )
