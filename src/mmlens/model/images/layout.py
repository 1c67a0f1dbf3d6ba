"""Image-token bookkeeping: where each image's tokens sit in a sequence and which pixels they see.

An `ImageTokenLayout` is computed from the inputs by the model family, never hard-coded. Each image
(`ImageSpan`) is a list of `Segment`s: the crops or tiles the family cuts it into (one grid for a
fixed-grid model; LLaVA-NeXT's base image then its unpadded tile grid; ...). A segment is a grid of
LLM tokens and a grid of vision patches, each laid over the image's *canvas* (the pixel space its
labels live in: the preprocessed image for a fixed grid, the original image for tiled families) by
pixel edges, with the LLM sequence positions of its tokens, where each token sits in the adapter's
output and each patch in the vision activation (any leading dims: per image, per tile, or one packed
sequence), and which token each patch feeds (many-to-one for merges and pooling). Tokens that are
not grid cells (row newlines, CLS, registers, image start/end) are recorded by kind.

`gather(stage, activation)` is the one way to read a stage's activation at the image tokens; rows
come out image by image, zero-padded to the longest image, with `table(stage)` telling which rows
are present and their cells and pixel boxes, and `pixels(stage)` with the `PixelMap` that paints
those rows onto pixels. Nothing above `model/` indexes image tokens by hand.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ...errors import LayoutMismatchError
from .pixel_map import GridCells, ImagePixelMaps, PixelMap, TokenGrid

if TYPE_CHECKING:
    from .vision_grids import VisionGrid

Stage = Literal["vision", "adapter", "llm"]
Index = tuple[Tensor, ...]  # one index tensor per leading dim of an activation
# Special-token kinds that belong to their image's attention block (bidirectional edits, knockouts
# of "the image"); other kinds (text-like start/end markers, tile separators) stay outside it.
# (`LEARNED_QUERY_KIND`: a Q-Former's queries, which stand for their image in the LLM's sequence)
IMAGE_BLOCK_KINDS = frozenset({"cls", "register", "newline", "query"})
LEARNED_QUERY_KIND = "query"
_EMPTY = torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True, eq=False)
class Segment:
    """One crop or tile of an image: its LLM token grid and its vision patch grid.

    `positions[i]` is the LLM sequence position of token i (raster order over `tokens`);
    `adapter_index` / `vision_index` hold one index tensor per leading dim of the adapter's output
    and of the vision activation (e.g. (tile, position) for per-tile batches, (row,) for a packed
    sequence); `patch_to_token[j]` is the token (index into this segment's tokens) patch j feeds,
    -1 when it feeds none (dropped by unpadding). Several patches may feed one token (merges)."""

    kind: str  # "grid" (a fixed-grid image), "base", "tiles", "tile", "thumbnail", ...
    tokens: GridCells
    positions: Int[Tensor, "n_tokens"]
    adapter_index: Index
    patches: GridCells
    vision_index: Index
    patch_to_token: Int[Tensor, "n_patches"]

    def __post_init__(self) -> None:
        n, p = len(self.tokens), len(self.patches)
        if len(self.positions) != n or any(len(i) != n for i in self.adapter_index):
            raise LayoutMismatchError(f"{self.kind} segment: {n} grid cells but {len(self.positions)} positions")
        if any(len(i) != p for i in self.vision_index) or len(self.patch_to_token) != p:
            raise LayoutMismatchError(f"{self.kind} segment: {p} patch cells but vision indices of other lengths")

    def shifted(self, vision: int, adapter: int) -> "Segment":
        """The segment of a replica whose leading vision/adapter items come later."""
        return replace(
            self,
            adapter_index=(self.adapter_index[0] + adapter, *self.adapter_index[1:]),
            vision_index=(self.vision_index[0] + vision, *self.vision_index[1:]),
        )


@dataclass(frozen=True, eq=False)
class ImageSpan:
    """One image inside one batch row: its segments in sequence order and its special tokens."""

    row: int  # batch row of the sequence
    image_index: int  # index of the image in `pixel_values` (and `image_sizes`, ...)
    segments: tuple[Segment, ...]
    canvas: tuple[int, int]  # (height, width) of the pixel space its boxes and labels live in
    # non-grid tokens by kind: "cls", "register", "newline", "start", "end", "separator" ...
    special: Mapping[str, Int[Tensor, "n"]] = field(default_factory=dict)

    @cached_property
    def positions(self) -> Int[Tensor, "n_tokens"]:
        """Sequence positions of every grid token, segment by segment, raster order in each."""
        return torch.cat([s.positions for s in self.segments]) if self.segments else _EMPTY

    @property
    def prefix_positions(self) -> Int[Tensor, "n_prefix"]:
        """Feature tokens the LLM sees before the grid (CLS, registers), in order."""
        parts = [self.special[k] for k in ("cls", "register") if k in self.special]
        return torch.cat(parts).sort().values if parts else _EMPTY

    @property
    def cls_position(self) -> int | None:
        cls = self.special.get("cls")
        return int(cls[0]) if cls is not None and len(cls) else None

    @property
    def block_positions(self) -> Int[Tensor, "n"]:
        """Every position of the image's attention block: grid tokens and the special kinds in
        `IMAGE_BLOCK_KINDS` (CLS, registers, row newlines)."""
        parts = [self.positions, *(v for k, v in self.special.items() if k in IMAGE_BLOCK_KINDS)]
        return torch.cat(parts).sort().values

    def shifted(self, rows: int, images: int, vision: int, adapter: int) -> "ImageSpan":
        return replace(self, row=self.row + rows, image_index=self.image_index + images,
                       segments=tuple(s.shifted(vision, adapter) for s in self.segments))


@dataclass(frozen=True, eq=False)
class TokenTable:
    """What the rows of `gather(stage, ...)` are: per image and row, whether the row is a real
    token (rows past an image's end are padding), its segment, its cell in that segment's grid and
    its pixel box (y0, x0, y1, x1) in the image's canvas."""

    present: Bool[Tensor, "n_images n"]
    segment: Int[Tensor, "n_images n"]
    cells: Int[Tensor, "n_images n 2"]
    boxes: Int[Tensor, "n_images n 4"]
    canvas: Int[Tensor, "n_images 2"]


@dataclass(frozen=True, eq=False)
class ImageTokenLayout:
    """Per batch row, its images; per image, its segments (see the module docstring).

    `vision_shape` / `adapter_shape` are the leading dims of the vision activations and of the
    adapter's output for this batch (e.g. (n_images, vision_seq) for LLaVA, (n_tiles, vision_seq)
    for LLaVA-NeXT, (n_patches,) for a packed sequence). `grids`, for a fixed-grid family, is its
    (LLM token, vision patch) grid, kept even for a batch without images.
    """

    images: tuple[tuple[ImageSpan, ...], ...]  # per batch row, its images in order
    seq_len: int
    vision_shape: tuple[int, ...]
    adapter_shape: tuple[int, ...]
    grids: tuple[TokenGrid, TokenGrid] | None = None

    # ------------------------------------------------------------- basics
    @property
    def batch_size(self) -> int:
        return len(self.images)

    @property
    def n_images(self) -> int:
        return sum(len(row) for row in self.images)

    @cached_property
    def spans(self) -> list[ImageSpan]:
        """All images of the batch in `pixel_values` order."""
        return sorted((s for row in self.images for s in row), key=lambda s: s.image_index)

    def positions(self, row: int, image: int = 0) -> Int[Tensor, "n_tokens"]:
        """Sequence positions of the grid tokens of image `image` in batch row `row`."""
        try:
            return self.images[row][image].positions
        except IndexError:
            raise IndexError(
                f"batch row {row} has {len(self.images[row]) if row < len(self.images) else 0} "
                f"image(s); asked for image {image} (batch size {self.batch_size})"
            ) from None

    # ------------------------------------------------------------- one grid for all (fixed-grid families)
    @cached_property
    def uniform(self) -> bool:
        """True when every image is one segment on the same grids and canvas (a fixed-grid family)."""
        if self.grids is None:
            return False
        tokens, patches = (g.cells_grid for g in self.grids)
        return all(
            len(s.segments) == 1 and s.canvas == self.grids[0].image_size
            and s.segments[0].tokens.same_as(tokens) and s.segments[0].patches.same_as(patches)
            for s in self.spans
        )

    def _uniform_grids(self) -> tuple[TokenGrid, TokenGrid]:
        if not self.uniform:
            raise LayoutMismatchError(
                "these images have their own token grids (tiles, variable resolution); there is no one grid "
                "for the batch: read per-image cells and boxes from layout.table(stage)"
            )
        return self.grids

    @property
    def token_grid(self) -> TokenGrid:
        """The LLM token grid every image shares (fixed-grid families only)."""
        return self._uniform_grids()[0]

    @property
    def patch_grid(self) -> TokenGrid:
        """The vision patch grid every image shares (fixed-grid families only)."""
        return self._uniform_grids()[1]

    @property
    def grid(self) -> tuple[int, int]:
        return self.token_grid.shape

    @property
    def token_cells(self) -> Int[Tensor, "n_tokens 2"]:
        return self.token_grid.cells

    @property
    def token_boxes(self) -> Int[Tensor, "n_tokens 4"]:
        return self.token_grid.boxes

    @property
    def patch_cells(self) -> Int[Tensor, "n_patches 2"]:
        return self.patch_grid.cells

    @property
    def patch_boxes(self) -> Int[Tensor, "n_patches 4"]:
        return self.patch_grid.boxes

    @property
    def patch_positions(self) -> Int[Tensor, "n_patches"]:
        """Index of each patch in one image's vision sequence (fixed-grid families)."""
        self._uniform_grids()
        if not self.spans:
            raise LayoutMismatchError("no images in this batch")
        return self.spans[0].segments[0].vision_index[-1]

    @property
    def patch_to_token(self) -> Int[Tensor, "n_patches"]:
        self._uniform_grids()
        if not self.spans:
            raise LayoutMismatchError("no images in this batch")
        return self.spans[0].segments[0].patch_to_token

    @property
    def vision_seq_len(self) -> int:
        return self.vision_shape[-1]

    @cached_property
    def vision_aligned(self) -> bool:
        """True when `gather("vision")` rows are `gather("llm")` rows one to one (each patch feeds
        the token of the same index: no merge, no pooling, nothing dropped)."""
        return all(
            torch.equal(seg.patch_to_token, torch.arange(len(seg.tokens))) for s in self.spans for seg in s.segments
        )

    def grid_of(self, stage: Stage) -> TokenGrid:
        """The grid `gather(stage, ...)` rows live on (fixed-grid families; else see `table`)."""
        return self.patch_grid if stage == "vision" else self.token_grid

    # ------------------------------------------------------------- vision grids of other towers
    @property
    def vision_grids(self) -> Mapping[str, "VisionGrid"]:
        """Vision grids besides this layout's own, keyed by the hook-name prefix of the points on
        them (a second tower's patches, `mmlens.model.images.vision_grids`); most families have none."""
        return {}

    def on_grid(self, grid: str) -> "ImageTokenLayout":
        """The layout a site on `grid` is read through: this one for "vision" and "llm" (the
        layout's own grids), the grid's own layout for a prefix in `vision_grids`."""
        if grid in ("vision", "llm"):
            return self
        if grid in self.vision_grids:
            return self.vision_grids[grid].layout
        close = difflib.get_close_matches(grid, ["vision", "llm", *self.vision_grids], n=3, cutoff=0.5)
        raise LayoutMismatchError(f"this layout has no grid {grid!r}; it has 'vision', 'llm'"
                                  f"{''.join(f', {g!r}' for g in self.vision_grids)}. Closest: {close or 'none'}")

    # ------------------------------------------------------------- per-image tables and gather
    def _grid(self, stage: Stage, segment: Segment) -> GridCells:
        return segment.patches if stage == "vision" else segment.tokens

    @cached_property
    def _slots(self) -> dict[str, tuple[Index, Tensor, Tensor, int]]:
        """Per stage: the index of every image-token row in the stage's activation (one tensor per
        leading dim), its (image, row) slot in the padded output, and the longest image's count."""
        out = {}
        for stage in ("vision", "adapter", "llm"):
            parts: list[Index] = []
            image, slot, longest = [], [], 0
            for k, span in enumerate(self.spans):
                n = 0
                for seg in span.segments:
                    if stage == "llm":
                        parts.append((torch.full_like(seg.positions, span.row), seg.positions))
                    else:
                        parts.append(seg.vision_index if stage == "vision" else seg.adapter_index)
                    n += len(parts[-1][0])
                longest = max(longest, n)
                image.append(torch.full((n,), k))
                slot.append(torch.arange(n))
            dims = len(self._shape(stage))
            index = tuple(torch.cat([p[d] for p in parts]) if parts else _EMPTY for d in range(dims))
            out[stage] = (index, torch.cat(image) if image else _EMPTY, torch.cat(slot) if slot else _EMPTY, longest)
        return out

    def _shape(self, stage: Stage) -> tuple[int, ...]:
        return self.vision_shape if stage == "vision" else self.adapter_shape if stage == "adapter" \
            else (self.batch_size, self.seq_len)

    def n_rows(self, stage: Stage) -> int:
        """Rows per image `gather(stage, ...)` returns (the longest image's count)."""
        return self._slots[self._check_stage(stage)][3]

    @staticmethod
    def _check_stage(stage: str) -> str:
        if stage not in ("vision", "adapter", "llm"):
            raise ValueError(f"stage must be 'vision', 'adapter' or 'llm', got {stage!r}")
        return stage

    def _take(self, stage: Stage, values: Tensor) -> Tensor:
        index, image, slot, longest = self._slots[stage]
        lead = len(index)
        picked = values[tuple(i.to(values.device) for i in index)]
        n = self.n_images
        if len(picked) == n * longest:  # every image has the same count: no padding needed
            return picked.view(n, longest, *values.shape[lead:])
        out = values.new_zeros((n, longest, *values.shape[lead:]))
        out[image.to(values.device), slot.to(values.device)] = picked
        return out

    def gather(self, stage: Stage, activation: Tensor) -> Float[Tensor, "n_images n_tokens ..."]:
        """A stage's activation at every image's grid tokens, image by image in `pixel_values` order,
        zero-padded to the longest image (`table(stage).present` marks the real rows).

        Vision activations have the leading dims `vision_shape` and come back at the patches (CLS,
        registers and unpadded-away patches left out, segment by segment); adapter activations have
        `adapter_shape` and LLM ones [batch, seq], both back at the LLM grid tokens (newlines and other
        special tokens left out). For a fixed-grid family nothing is padded.
        """
        stage = self._check_stage(stage)
        lead = len(self._slots[stage][0])
        if tuple(activation.shape[:lead]) != tuple(self._shape(stage)):
            raise LayoutMismatchError(
                f"a {stage} activation of shape {tuple(activation.shape)} for a layout whose {stage} leading "
                f"dims are {tuple(self._shape(stage))}; was it computed from these inputs?"
            )
        return self._take(stage, activation)

    def by_image(self, values: Tensor) -> Tensor:
        """`values` laid out [batch, seq, ...] (a token mask, activations) taken at each image's
        grid tokens: [n_images, n_tokens, ...], images in `pixel_values` order (zero-padded)."""
        return self._take("llm", values)

    @cached_property
    def _tables(self) -> dict[str, TokenTable]:
        out = {}
        for stage in ("vision", "adapter", "llm"):
            n, longest = self.n_images, self._slots[stage][3]
            present = torch.zeros(n, longest, dtype=torch.bool)
            segment = torch.full((n, longest), -1, dtype=torch.long)
            cells = torch.zeros(n, longest, 2, dtype=torch.long)
            boxes = torch.zeros(n, longest, 4, dtype=torch.long)
            for k, span in enumerate(self.spans):
                start = 0
                for s, seg in enumerate(span.segments):
                    grid = seg.patches if stage == "vision" else seg.tokens
                    end = start + len(grid)
                    present[k, start:end] = True
                    segment[k, start:end] = s
                    cells[k, start:end], boxes[k, start:end] = grid.cells, grid.boxes
                    start = end
            canvas = torch.tensor([s.canvas for s in self.spans], dtype=torch.long).view(-1, 2)
            out[stage] = TokenTable(present, segment, cells, boxes, canvas)
        return out

    def table(self, stage: Stage) -> TokenTable:
        """Presence, segment, cell and pixel box of every row `gather(stage, ...)` returns."""
        return self._tables[self._check_stage(stage)]

    def pixel_map(self, stage: Stage) -> Int[Tensor, "n_images height width"]:
        """For every canvas pixel of every image (canvases padded to the largest), the row of
        `gather(stage, ...)` whose box covers it, or -1. Where segments overlap (a base image and its
        tiles) the later, finer segment wins."""
        return self._segment_maps(stage).painted

    def _segment_maps(self, stage: Stage) -> ImagePixelMaps:
        stage = self._check_stage(stage)
        if stage not in self._pixel_maps:
            size = tuple(max((s.canvas[d] for s in self.spans), default=0) for d in (0, 1))
            self._pixel_maps[stage] = ImagePixelMaps(size, [[self._grid(stage, seg) for seg in span.segments]
                                                            for span in self.spans])
        return self._pixel_maps[stage]

    @cached_property
    def _pixel_maps(self) -> dict[str, ImagePixelMaps]:
        return {}

    def pixels(self, stage: Stage) -> PixelMap:
        """What paints `gather(stage, ...)` rows onto canvas pixels and what each row's box holds:
        the grid every image of a fixed-grid family shares, otherwise the images' own maps."""
        return self.grid_of(stage) if self.uniform else self._segment_maps(stage)

    # ------------------------------------------------------------- selections across stages
    def scatter_adapter(self, selected: Bool[Tensor, "batch seq"], n_adapter: int | None = None) -> Bool[Tensor, "..."]:
        """A [batch, seq] selection of image tokens as the same selection of the adapter's output
        (a mask of `adapter_shape`; `n_adapter` overrides its last dim)."""
        shape = list(self.adapter_shape)
        if n_adapter is not None:
            shape[-1] = n_adapter
        out = torch.zeros(shape, dtype=torch.bool)
        selected = selected.cpu()
        for span in self.spans:
            for seg in span.segments:
                out[seg.adapter_index] = selected[span.row, seg.positions]
        return out

    def scatter_vision(self, selected: Bool[Tensor, "batch seq"]) -> Bool[Tensor, "..."]:
        """A [batch, seq] selection of image tokens as a selection of the vision patches feeding
        them (a mask of `vision_shape`)."""
        out = torch.zeros(self.vision_shape, dtype=torch.bool)
        selected = selected.cpu()
        for span in self.spans:
            for seg in span.segments:
                feeds = seg.patch_to_token >= 0
                chosen = torch.zeros(len(seg.patch_to_token), dtype=torch.bool)
                chosen[feeds] = selected[span.row, seg.positions[seg.patch_to_token[feeds]]]
                out[seg.vision_index] = chosen
        return out

    def image_of_patch(self) -> Int[Tensor, "..."]:
        """For every vision position (a tensor of `vision_shape`), the image (`pixel_values`
        order) whose patch it is, or -1 (CLS, registers)."""
        out = torch.full(self.vision_shape, -1, dtype=torch.long)
        for span in self.spans:
            for seg in span.segments:
                out[seg.vision_index] = span.image_index
        return out

    def image_of_position(self) -> Int[Tensor, "batch seq"]:
        """For every position, which image of its row it belongs to (0, 1, ...; its whole attention
        block: grid, CLS, registers and newlines) or -1."""
        out = torch.full((self.batch_size, self.seq_len), -1, dtype=torch.long)
        for row in self.images:
            for k, span in enumerate(row):
                out[span.row, span.block_positions] = k
        return out

    def image_token_mask(self) -> Bool[Tensor, "batch seq"]:
        """True at every image grid token (CLS, registers, newlines and other specials excluded)."""
        mask = torch.zeros(self.batch_size, self.seq_len, dtype=torch.bool)
        for row in self.images:
            for span in row:
                mask[span.row, span.positions] = True
        return mask

    def special_positions(self, kind: str) -> Bool[Tensor, "batch seq"]:
        """True at every special token of `kind` ("newline", "cls", ...)."""
        mask = torch.zeros(self.batch_size, self.seq_len, dtype=torch.bool)
        for span in self.spans:
            if kind in span.special:
                mask[span.row, span.special[kind]] = True
        return mask

    # ------------------------------------------------------------- batches of batches
    def repeat(self, k: int) -> "ImageTokenLayout":
        """The layout of the batch repeated `k` times, replica-major (see `MultimodalInputs.repeat`)."""
        b, n, v, a = self.batch_size, self.n_images, self.vision_shape[0], self.adapter_shape[0]
        rows = tuple(
            tuple(s.shifted(r * b, r * n, r * v, r * a) for s in row)
            for r in range(k) for row in self.images
        )
        return replace(self, images=rows, vision_shape=(v * k, *self.vision_shape[1:]),
                       adapter_shape=(a * k, *self.adapter_shape[1:]))

    def same_geometry(self, other: "ImageTokenLayout") -> bool:
        """True when both layouts put the same images at the same positions with the same grids (for patching)."""
        if (self.seq_len, self.vision_shape, self.adapter_shape) != (other.seq_len, other.vision_shape, other.adapter_shape) \
                or [len(r) for r in self.images] != [len(r) for r in other.images]:
            return False
        return all(same_span(a, b) for ra, rb in zip(self.images, other.images) for a, b in zip(ra, rb))


class PackedLayout(ImageTokenLayout):
    """A layout whose vision and adapter activations are one packed sequence `[1, n, ...]` (index
    tensors (0, k): Qwen2-VL's and Mistral 3's towers): a repeated batch packs its replicas one
    after the other along the sequence, not along dim 0."""

    def repeat(self, k: int) -> "PackedLayout":
        b, n = self.batch_size, self.n_images
        v, a = self.vision_shape[1], self.adapter_shape[1]

        def shift(span: ImageSpan, r: int) -> ImageSpan:
            segments = tuple(
                replace(s, vision_index=(s.vision_index[0], s.vision_index[1] + r * v),
                        adapter_index=(s.adapter_index[0], s.adapter_index[1] + r * a))
                for s in span.segments
            )
            return replace(span, row=span.row + r * b, image_index=span.image_index + r * n, segments=segments)

        rows = tuple(tuple(shift(s, r) for s in row) for r in range(k) for row in self.images)
        return replace(self, images=rows, vision_shape=(1, v * k), adapter_shape=(1, a * k))


class CrossAttendedLayout(ImageTokenLayout):
    """The layout of a family whose LLM reads images through cross-attention (Mllama): the images
    are keys and values of the cross-attention layers, never tokens of the LLM's sequence.

    Its `llm` stage is therefore the cross-attention keys: `seq_len` is the number of keys per batch
    row (every image slot's tiles, each a CLS then its patches, in `cross_attention_states` order) and
    a segment's `positions` are key indices, so `gather("llm", cache["blocks.{l}.cross_attn.hook_k"])`
    reads the keys at each image's cells (each tile one segment; the CLS keys are `special["cls"]`),
    each key's heads concatenated (`[n_images, n, heads * d_head]`: the vector a probe reads).
    Selections of image tokens in the text sequence (`image_token_mask`, `image_of_position`: what
    knockouts, the bidirectional edit and probes at LLM image positions are built on) are refused:
    there are none. Text tokens read the images by cross-attention instead."""

    @staticmethod
    def _no_image_tokens(what: str) -> LayoutMismatchError:
        return LayoutMismatchError(
            f"{what}: this model's LLM holds no image tokens (its images are the keys and values of its "
            "cross-attention layers), so there are no image positions in the text sequence. Read the images at "
            "the cross-attention keys (`gather('llm', cache['blocks.{l}.cross_attn.hook_k'])`), the tower or the "
            "adapter, and edit what text reads from them with the cross-attention knockout or gates")

    def gather(self, stage: Stage, activation: Tensor) -> Float[Tensor, "n_images n_tokens ..."]:
        if stage == "llm" and activation.ndim > 1 and activation.shape[1] != self.seq_len:
            raise self._no_image_tokens(f"an LLM activation of shape {tuple(activation.shape)} (text positions) "
                                        f"where the cross-attention keys ({self.seq_len} per row) were expected")
        gathered = super().gather(stage, activation)
        return gathered.flatten(2) if stage == "llm" and gathered.ndim > 3 else gathered

    def image_of_position(self) -> Int[Tensor, "batch seq"]:
        raise self._no_image_tokens("image_of_position")

    def image_token_mask(self) -> Bool[Tensor, "batch seq"]:
        raise self._no_image_tokens("image_token_mask")

    def by_image(self, values: Tensor) -> Tensor:
        raise self._no_image_tokens("by_image")


class LearnedQueryLayout(ImageTokenLayout):
    """The layout of a family whose adapter hands the LLM learned queries (BLIP-2's Q-Former): a
    fixed number of tokens per image, each reading the whole image through cross-attention, so no
    token has a pixel box. Each image's queries are its special tokens of `LEARNED_QUERY_KIND` (its
    attention block: knockouts and the bidirectional edit select them), and its one segment holds its
    vision patches alone (no tokens; patches feed none), so the tower reads as in any family.

    Reading the adapter or LLM stage at pixel boxes (`gather`, probes at those sites) is refused:
    there are none. What each query reads of the image is its cross-attention pattern over the
    patches (`adapter.blocks.{i}.cross_attn.hook_pattern`), data-dependent, not a box."""

    def gather(self, stage: Stage, activation: Tensor) -> Float[Tensor, "n_images n_tokens ..."]:
        if self._check_stage(stage) != "vision":
            raise LayoutMismatchError(
                f"gather({stage!r}): these images reach the LLM as learned queries (a Q-Former's), which have no "
                "pixel grid, so no adapter or LLM token has a pixel box to probe. Read the vision stage (vision.* "
                f"sites), or the queries at layout.special_positions({LEARNED_QUERY_KIND!r}); which patches each "
                "query reads is its cross-attention pattern (adapter.blocks.{i}.cross_attn.hook_pattern)")
        return super().gather(stage, activation)


def same_span(a: ImageSpan, b: ImageSpan) -> bool:
    """Same positions, specials, canvas and grids (two images patched onto each other)."""
    if a.canvas != b.canvas or len(a.segments) != len(b.segments) or set(a.special) != set(b.special):
        return False
    if not all(torch.equal(a.special[k], b.special[k]) for k in a.special):
        return False
    return all(
        torch.equal(x.positions, y.positions) and x.tokens.same_as(y.tokens) and x.patches.same_as(y.patches)
        for x, y in zip(a.segments, b.segments)
    )


def image_runs(input_ids: Int[Tensor, "batch seq"], image_token_id: int) -> list[Int[Tensor, "n"]]:
    """Per batch row, the positions of the image placeholder tokens, in order."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    is_image = (input_ids == image_token_id).cpu()
    return [torch.nonzero(row).flatten() for row in is_image]


def compute_layout(
    input_ids: Int[Tensor, "batch seq"],
    *,
    image_token_id: int,
    image_size: tuple[int, int],
    patch_grid: tuple[int, int],
    token_grid: tuple[int, int],
    patch_to_token: Int[Tensor, "n_patches"],
    vision_prefix: int,
    llm_sees_cls: bool,
    llm_prefix: int | None = None,
) -> ImageTokenLayout:
    """The layout of a fixed-grid family: one segment per image.

    Each image contributes `llm_prefix` (CLS and register tokens; by default `llm_sees_cls`)
    and then `len(token_grid)` consecutive placeholder tokens; a run of placeholders is split into
    images of that size, and images are numbered in row-major batch order, which is the order of
    `pixel_values`. The vision activation is [n_images, vision_prefix + n_patches, ...] and the
    adapter's output [n_images, llm_prefix + n_tokens, ...].
    """
    tokens = TokenGrid(*token_grid, image_size=image_size)
    patches = TokenGrid(*patch_grid, image_size=image_size)
    llm_prefix = int(llm_sees_cls) if llm_prefix is None else llm_prefix
    n_tokens, n_patches = len(tokens), len(patches)
    per_image = n_tokens + llm_prefix
    patch_positions = torch.arange(n_patches) + vision_prefix
    adapter_positions = torch.arange(n_tokens) + llm_prefix
    rows: list[tuple[ImageSpan, ...]] = []
    image_index = 0
    for b, where in enumerate(image_runs(input_ids, image_token_id)):
        if len(where) % per_image:
            raise LayoutMismatchError(
                f"batch row {b} has {len(where)} image tokens, not a multiple of the {per_image} "
                "tokens one image takes; were the prompts expanded by this model's processor?"
            )
        spans = []
        for start in range(0, len(where), per_image):
            block = where[start : start + per_image]
            if block[-1] - block[0] != per_image - 1:
                raise LayoutMismatchError(
                    f"batch row {b}: the image tokens at positions {block[0].item()}..."
                    f"{block[-1].item()} are not contiguous"
                )
            segment = Segment(
                "grid", tokens.cells_grid, block[llm_prefix:].clone(),
                (torch.full((n_tokens,), image_index), adapter_positions),
                patches.cells_grid, (torch.full((n_patches,), image_index), patch_positions), patch_to_token,
            )
            special = {}
            if llm_prefix:
                cls = int(llm_sees_cls)
                if cls:
                    special["cls"] = block[:1].clone()
                if llm_prefix > cls:
                    special["register"] = block[cls:llm_prefix].clone()
            spans.append(ImageSpan(b, image_index, (segment,), image_size, special))
            image_index += 1
        rows.append(tuple(spans))
    return ImageTokenLayout(
        images=tuple(rows),
        seq_len=input_ids.shape[1],
        vision_shape=(image_index, n_patches + vision_prefix),
        adapter_shape=(image_index, per_image),
        grids=(tokens, patches),
    )


# The special kind of a code grid's end-of-row tokens: placeholders of their image's attention block,
# as row newlines are (Emu3 writes its end-of-row token after each row of codes)
END_OF_ROW_KIND = "newline"


@dataclass(frozen=True, eq=False)
class CodeGridLayout(ImageTokenLayout):
    """The layout of a family whose images reach the LLM as discrete codes (a VQ tokenizer's, Emu3):
    each image an h x w grid of code tokens, each covering a `code_size` x `code_size` pixel box (the
    tokenizer's spatial downsampling), written row by row with an end-of-row token after each row
    (special kind `END_OF_ROW_KIND`, a placeholder of the image's block, in no grid) and markers around
    (`start`, `end`: text, outside the block). The vision stage is the tokenizer's encoder at code
    resolution, `[n_images, rows * cols, ...]` over the batch's padded code grid (the images' own cells
    are the patches; the padding's belong to no image); the adapter's output is one flat sequence of
    every image's code tokens, end-of-row tokens included. Which code each token is comes from an
    argmin, so nothing differentiable joins pixels to the LLM: gradients stop at the codes."""

    code_size: int = 1


def contiguous_images(input_ids: Int[Tensor, "batch seq"], image_token_id: int, counts: list[int],
                      source: str) -> list[list[tuple[int, Int[Tensor, "n"]]]]:
    """Per batch row, its images as (index in `pixel_values` order, placeholder positions): image `i`
    is the next `counts[i]` placeholders of its row, which must be one contiguous run. `source` says
    what gave the counts, for the error when they do not match the placeholders."""
    runs = image_runs(input_ids, image_token_id)
    if sum(len(r) for r in runs) != sum(counts):
        raise LayoutMismatchError(f"input_ids hold {sum(len(r) for r in runs)} image placeholders but {source} need "
                                  f"{sum(counts)}; were the prompts expanded by this model's processor?")
    rows, image = [], 0
    for b, where in enumerate(runs):
        blocks, taken = [], 0
        while taken < len(where):
            block = where[taken : taken + counts[image]]
            if len(block) < counts[image] or int(block[-1] - block[0]) != counts[image] - 1:
                raise LayoutMismatchError(f"batch row {b}: the {counts[image]} placeholders of image {image} are not "
                                          "one contiguous run of the row")
            blocks.append((image, block))
            image, taken = image + 1, taken + counts[image]
        rows.append(blocks)
    return rows


def code_grid_layout(
    input_ids: Int[Tensor, "batch seq"],
    code_grids: list[tuple[int, int]],
    *,
    image_token_id: int,
    padded_grid: tuple[int, int],
    code_size: int,
    markers: Mapping[str, int | None] | None = None,
) -> CodeGridLayout:
    """The layout of a batch whose image `i` (`pixel_values` order) is `code_grids[i]` = (rows, cols)
    codes, its `rows * (cols + 1)` placeholders contiguous in its batch row. `markers` (`{"start": id,
    "end": id}`) are checked at the token before and after each image when given and recorded as specials."""
    padded_cols = padded_grid[1]
    counts = [rows * (cols + 1) for rows, cols in code_grids]
    spans_by_row: list[tuple[ImageSpan, ...]] = []
    adapter_offset = 0
    for b, blocks in enumerate(contiguous_images(input_ids, image_token_id, counts, f"the images' code grids {code_grids}")):
        spans = []
        for image, block in blocks:
            (rows, cols), n = code_grids[image], counts[image]
            cells = GridCells.uniform(rows, cols, rows * code_size, cols * code_size)
            grid = torch.arange(n).view(rows, cols + 1)
            r, c = cells.cells.unbind(1)
            segment = Segment(
                "grid", cells, block.view(rows, cols + 1)[:, :cols].flatten().clone(),
                (adapter_offset + grid[:, :cols].flatten(),),
                cells, (torch.full((rows * cols,), image), r * padded_cols + c), torch.arange(rows * cols),
            )
            special = {END_OF_ROW_KIND: block.view(rows, cols + 1)[:, cols].clone()}
            for kind, position in (("start", int(block[0]) - 1), ("end", int(block[-1]) + 1)):
                token = (markers or {}).get(kind)
                if token is None:
                    continue
                if not 0 <= position < input_ids.shape[1] or int(input_ids[b, position]) != token:
                    raise LayoutMismatchError(f"batch row {b}: image {image} has no {kind} marker (token {token}) next "
                                              "to its placeholders; were the prompts expanded by this model's processor?")
                special[kind] = torch.tensor([position])
            spans.append(ImageSpan(b, image, (segment,), (rows * code_size, cols * code_size), special))
            adapter_offset += n
        spans_by_row.append(tuple(spans))
    return CodeGridLayout(images=tuple(spans_by_row), seq_len=input_ids.shape[1],
                          vision_shape=(len(code_grids), padded_grid[0] * padded_cols),
                          adapter_shape=(adapter_offset,), code_size=code_size)
