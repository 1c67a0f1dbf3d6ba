"""Attention on the image: where one head, from chosen queries, looks on the image.

An LLM head's pattern row from a query token (or the mean row of a token group, such as the
prompt's last text token) is read at each image's grid tokens through the layout, so its values
are per image cell and its pixels are that cell's box, for any family: one grid, anyres tiles over
a base image, variable-resolution merged grids. A vision-tower head's queries are patches: pick an
image cell (row, col) and its row is read at every patch of the image (zero across tiles or images
its attention never reaches). A second vision grid (DeepSeek-VL hybrid's SAM, FastVLM's finer
stages) is a stage named by its hook prefix: its heads are read on its own patch grid, a windowed
block's row put back on the raster around its window. Only the one pattern hook is cached.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from ..interventions import TokenGroup
from ..model import HookedMLLM, MultimodalInputs
from ..model.images.layout import Segment, TokenTable
from ..model.images.vision_grids import blocks_on_grid
from .pictures import picture_as_seen

Stage = Literal["llm", "vision"] | str  # or a second vision grid's hook prefix, e.g. "vision.high_res"
Query = int | Sequence[int] | str | TokenGroup | tuple[int, int]


def _last_text() -> TokenGroup:
    def resolve(inputs, context):
        text = TokenGroup.text().resolve(inputs, context)
        last = text.shape[1] - 1 - text.flip(1).long().argmax(dim=1)
        mask = torch.zeros_like(text)
        mask[torch.arange(len(text)), last] = text.any(dim=1)
        return mask
    return TokenGroup(resolve, "last text token")


# query groups by name (LLM stage): what a researcher asks "where does ... look?" about
NAMED_QUERIES = {
    "last_text": _last_text,
    "last": TokenGroup.last,
    "text": TokenGroup.text,
    "image": TokenGroup.image,
    "bos": TokenGroup.bos,
}


@dataclass
class ImageAttention:
    """Attention of `heads` of one layer from a query to each image's grid cells.

    `values[h, i, n]`: head `heads[h]`'s attention on row n of `layout.gather(stage, ...)` for image
    i (pixel order; rows past an image's end, `table.present` False, are 0); `table` gives each
    row's segment, cell and pixel box on the image's canvas. `mass[h, i]` is the attention on image
    i's grid tokens (the sum of its row of `values`). `images[i]` is the picture the model saw
    ([height, width, 3] uint8; a tiled image's base tile, which spans the whole canvas)."""

    stage: Stage
    layer: int
    heads: list[int]
    query: str
    values: Float[Tensor, "n_heads n_images n_cells"]
    table: TokenTable
    segments: list[tuple[Segment, ...]]
    canvases: list[tuple[int, int]]
    images: list[np.ndarray]
    query_patch: tuple[int, int, int, int] | None = None  # vision stage: (image, segment, row, col) of the query

    @property
    def mass(self) -> Float[Tensor, "n_heads n_images"]:
        return self.values.sum(-1)

    def segment_grid(self, head: int, image: int, segment: int | None = None) -> Float[Tensor, "rows cols"]:
        """Head `head`'s values on one segment of image `image` as its (rows, cols) grid (the
        image's finest segment by default: its only one for a fixed-grid family)."""
        h = self._head_slot(head)
        segment = self.finest_segment(image) if segment is None else segment
        grids = self._grids(image)
        if not 0 <= segment < len(grids):
            raise InputError(f"image {image} has {len(grids)} segment(s) (0..{len(grids) - 1}); asked for {segment}")
        start = sum(len(g) for g in grids[:segment])
        cells = grids[segment]
        return self.values[h, image, start : start + len(cells)].view(cells.shape)

    def finest_segment(self, image: int) -> int:
        grids = self._grids(image)
        return max(range(len(grids)), key=lambda s: len(grids[s]))

    def grid_cells(self, image: int, segment: int):
        """The `GridCells` (pixel edges on the canvas) of one segment's rows of `values`."""
        return self._grids(image)[segment]

    def _grids(self, image: int):
        if not 0 <= image < len(self.segments):
            raise InputError(f"there are {len(self.segments)} image(s) (0..{len(self.segments) - 1}); asked for {image}")
        return [s.tokens if self.stage == "llm" else s.patches for s in self.segments[image]]

    def _head_slot(self, head: int) -> int:
        if head not in self.heads:
            raise InputError(f"head {head} was not read; these values hold heads {self.heads}")
        return self.heads.index(head)


def _checked(what: str, value: int, count: int) -> int:
    if not isinstance(value, (int, np.integer)) or not 0 <= value < count:
        raise InputError(f"{what} must be an integer in 0..{count - 1}, got {value!r}")
    return int(value)


def _pattern_name(model: HookedMLLM, stage: Stage, layer: int) -> str:
    grids = model.architecture.vision_grid_prefixes
    if stage not in ("llm", "vision", *grids):
        others = f" or a vision grid of this model ({', '.join(map(repr, grids))})" if grids else ""
        raise InputError(f"stage must be 'llm' (blocks.{{l}}.attn) or 'vision' (the tower){others}, got {stage!r}")
    prefix = {"llm": "", "vision": "vision."}.get(stage, f"{stage}.")
    n_layers = (model.cfg.llm.n_layers if stage == "llm" else model.cfg.vision.n_layers if stage == "vision"
                else blocks_on_grid(model.hook_dict, stage))
    _checked(f"{stage} layer", layer, n_layers)
    name = f"{prefix}blocks.{layer}.attn.hook_pattern"
    if name not in model.hook_dict:
        with_pattern = [l for l in range(n_layers) if f"{prefix}blocks.{l}.attn.hook_pattern" in model.hook_dict]
        raise InputError(f"{stage} layer {layer} has no softmax attention pattern ({name}); layers that do: {with_pattern}")
    return name


def _head_list(heads, n_heads: int, stage: Stage) -> list[int]:
    heads = list(range(n_heads)) if heads is None else [heads] if isinstance(heads, (int, np.integer)) else list(heads)
    if not heads:
        raise InputError("no heads given")
    return [_checked(f"{stage} head", h, n_heads) for h in heads]


def _llm_queries(query, inputs: MultimodalInputs) -> tuple[torch.Tensor, str]:
    """[batch, seq] mask of the query positions and a description."""
    seq = inputs.input_ids.shape[1]
    if isinstance(query, str):
        if query not in NAMED_QUERIES:
            close = difflib.get_close_matches(query, list(NAMED_QUERIES), n=3, cutoff=0.4)
            raise InputError(f"unknown query group {query!r}; did you mean {close or list(NAMED_QUERIES)}? The names are "
                             f"{list(NAMED_QUERIES)}; or pass a position, a list of positions or a TokenGroup")
        group = NAMED_QUERIES[query]()
    elif isinstance(query, TokenGroup):
        group = query
    else:
        positions = [query] if isinstance(query, (int, np.integer)) else list(query)
        if not positions:
            raise InputError("no query positions given")
        for p in positions:
            _checked("query position", p, seq)
        group = TokenGroup.positions(positions)
    mask = group.resolve(inputs)
    empty = [b for b in range(len(mask)) if not mask[b].any()]
    if empty:
        raise InputError(f"the query {group.description!r} selects no (non-padding) token in batch row(s) {empty}; "
                         f"positions run 0..{seq - 1}")
    return mask, group.description


@torch.no_grad()
def attention_on_image(
    model: HookedMLLM,
    inputs: MultimodalInputs,
    layer: int,
    heads: int | Sequence[int] | None = None,
    query: Query = "last_text",
    *,
    stage: Stage = "llm",
    image: int = 0,
    segment: int | None = None,
) -> ImageAttention:
    """Attention of `heads` (all by default) of `layer` from `query` to every image's grid cells.

    LLM stage (`blocks.{layer}.attn`): `query` is a position, a list of positions, a `TokenGroup`
    or a group name (`NAMED_QUERIES`: "last_text", "last", "text", "image", "bos"); per batch row,
    the pattern rows of its query positions are averaged, and each image of the row is read there.
    Vision stage (`vision.blocks.{layer}.attn`): `query` is a (row, col) cell of image `image`'s
    patch grid (in its finest segment unless `segment` is given); its pattern row is read at every
    patch of every image (zero where it cannot reach: other tiles, other images).
    A second vision grid (`stage` one of `model.architecture.vision_grid_prefixes`, e.g.
    "vision.high_res" for DeepSeek-VL hybrid's SAM, "vision.stages.3" for a FastVLM attention stage):
    `{stage}.blocks.{layer}.attn`, `query` a (row, col) cell of that grid; a windowed block's row
    covers the query's window (zero elsewhere, its padding keys left out)."""
    name = _pattern_name(model, stage, layer)
    on_grid = stage not in ("llm", "vision")
    if not on_grid:
        heads = _head_list(heads, (model.cfg.llm if stage == "llm" else model.cfg.vision).n_heads, stage)
    layout = inputs.layout
    if layout is None or not layout.n_images:
        raise InputError("these inputs hold no image; build them with model.prepare(images, prompts)")
    grid = layout.on_grid(stage) if on_grid else layout
    vision_query, query_patch = None, None
    if stage != "llm":
        vision_query = _vision_query(grid, query, image, segment)
    else:
        query_mask, description = _llm_queries(query, inputs)
    _, cache = model.run_with_cache(inputs, names_filter=[name])
    if on_grid:  # a second grid's head count is its own tower's, read off the pattern [.., heads, query, key]
        heads = _head_list(heads, cache[name].shape[-3], stage)
    pattern = cache[name][..., heads, :, :].float().cpu()
    if stage == "llm":
        weights = query_mask.float() / query_mask.sum(1, keepdim=True)
        rows = torch.einsum("bq,bhqk->bkh", weights, pattern)  # [batch, seq, heads]: each row's mean query
        values = layout.gather("llm", rows)
    elif on_grid:
        index, description, query_patch = vision_query
        values = grid.gather("vision", _grid_query_row(grid, pattern, index))
    else:
        index, description, query_patch = vision_query
        lead, position = index[:-1], index[-1]
        rows = torch.zeros(*layout.vision_shape, len(heads))
        rows[lead] = pattern[lead][:, position, :].T  # the query's row, in its own tile or packed sequence
        values = layout.gather("vision", rows)
    table = grid.table("llm" if stage == "llm" else "vision")
    values = torch.where(table.present[..., None], values, torch.zeros_like(values)).permute(2, 0, 1).contiguous()
    images = [picture_as_seen(model, model.architecture.image_pixels(inputs.pixel_values, s.image_index, span=s,
                                                                   **inputs.extra, **inputs.layout_inputs)) for s in layout.spans]
    spans = grid.spans  # a second grid's cells, on the layout's canvas
    return ImageAttention(stage, layer, heads, description, values, table, [s.segments for s in spans],
                          [tuple(s.canvas) for s in spans], images, query_patch)


def _grid_query_row(grid, pattern: Float[Tensor, "n heads query key"], index: tuple[Tensor, ...]) -> Tensor:
    """The query's pattern row as [n, key, heads] (zero in every other row of n), which the grid's
    `gather` puts on its raster: `index` is the query patch's (image, raster position); a windowed
    block's patterns are per window, so the (window, position) it sits at is found by sending each
    pattern row's number through the same raster map."""
    n, _, queries, keys = pattern.shape
    numbered = grid.on_raster(torch.arange(n * queries).view(n, queries))
    if tuple(numbered.shape) != tuple(grid.vision_shape[:2]):
        raise InputError(f"a pattern of shape {tuple(pattern.shape)} is not on the {grid.prefix}.* grid's "
                         f"{tuple(grid.vision_shape[:2])} (image, patch) positions, whole or in windows")
    flat = int(numbered[tuple(int(i) for i in index)])
    at, query = divmod(flat, queries)
    rows = torch.zeros(n, keys, pattern.shape[1])
    rows[at] = pattern[at, :, query, :].T
    return rows


@dataclass
class AttentionPattern:
    """One batch row's LLM attention at one layer, padding left out: `pattern[h, q, k]` for head
    `heads[h]`, `labels[i]` the token at `positions[i]` as `model.to_str_tokens` writes it (image
    tokens by image and cell from the layout: `<img0 r3c5>`), `is_image[i]` True at image grid tokens."""

    layer: int
    heads: list[int]
    row: int
    positions: list[int]
    labels: list[str]
    is_image: list[bool]
    pattern: Float[Tensor, "n_heads n_tokens n_tokens"]


@torch.no_grad()
def attention_pattern(model: HookedMLLM, inputs: MultimodalInputs, layer: int, heads: int | Sequence[int] | None = None,
                      *, row: int = 0) -> AttentionPattern:
    """The attention pattern of `heads` (all by default) of LLM `layer` on batch row `row`, with
    every token labelled (for `mmlens.viz.plot_attention_pattern`)."""
    name = _pattern_name(model, "llm", layer)
    n_heads = model.cfg.llm.n_heads
    heads = list(range(n_heads)) if heads is None else [heads] if isinstance(heads, (int, np.integer)) else list(heads)
    heads = [_checked("llm head", h, n_heads) for h in heads]
    row = _checked("batch row", row, len(inputs.input_ids))
    keep = inputs.attention_mask[row].bool().cpu().nonzero().flatten()
    _, cache = model.run_with_cache(inputs, names_filter=[name])
    pattern = cache[name][row, heads].float().cpu()[:, keep][:, :, keep]
    labels = model.to_str_tokens(inputs)[row]  # image inputs give one list per batch row, even for one row
    is_image = inputs.layout.image_token_mask()[row] if inputs.layout is not None else torch.zeros(len(labels), dtype=bool)
    positions = keep.tolist()
    return AttentionPattern(layer, heads, row, positions, [labels[p] for p in positions],
                            [bool(is_image[p]) for p in positions], pattern)


def _vision_query(layout, query, image: int, segment: int | None) -> tuple[tuple[int, ...], str, tuple[int, int, int, int]]:
    spans = layout.spans
    image = _checked("image", image, len(spans))
    segments = spans[image].segments
    if segment is None:
        segment = max(range(len(segments)), key=lambda s: len(segments[s].patches))
    segment = _checked(f"segment of image {image}", segment, len(segments))
    chosen = segments[segment]
    rows, cols = chosen.patches.shape
    if not (isinstance(query, tuple) and len(query) == 2 and all(isinstance(v, (int, np.integer)) for v in query)):
        raise InputError(f"a vision-tower query is a patch cell (row, col) of image {image}'s {rows} x {cols} patch grid "
                         f"(segment {segment}, {chosen.kind!r}), got {query!r}")
    row, col = (_checked("query row", query[0], rows), _checked("query col", query[1], cols))
    j = row * cols + col
    where = f"image {image} patch [{row},{col}]" + (f" ({chosen.kind})" if len(segments) > 1 else "")
    return tuple(int(i[j]) for i in chosen.vision_index), where, (image, segment, row, col)


__all__ = ["NAMED_QUERIES", "AttentionPattern", "ImageAttention", "attention_on_image", "attention_pattern"]
