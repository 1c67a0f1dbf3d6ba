"""Image-token bookkeeping: where each image's tokens sit in a sequence and which pixels they see.

An `ImageTokenLayout` is computed from the input ids and the model config, never hard-coded. It
maps, per batch row and per image, the sequence positions of the image tokens to cells of the
token grid and to pixel boxes of the preprocessed image, and does the same for the vision
encoder's patches, with the patch -> LLM-token map between the two grids. `gather` is the one
way to read a stage's activation at the image tokens; nothing above `model/` indexes them by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

Stage = Literal["vision", "adapter", "llm"]


@dataclass(frozen=True)
class TokenGrid:
    """A rows x cols grid of tokens tiling an image of `image_size` = (height, width) pixels."""

    rows: int
    cols: int
    image_size: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    def __len__(self) -> int:
        return self.rows * self.cols

    @cached_property
    def cells(self) -> Int[Tensor, "n_tokens 2"]:
        """(row, col) of every token, in raster order."""
        r, c = torch.meshgrid(torch.arange(self.rows), torch.arange(self.cols), indexing="ij")
        return torch.stack([r.flatten(), c.flatten()], dim=1)

    @cached_property
    def boxes(self) -> Int[Tensor, "n_tokens 4"]:
        """Pixel box (y0, x0, y1, x1) of every token, end-exclusive, in the preprocessed image."""
        height, width = self.image_size
        y_edges = torch.div(torch.arange(self.rows + 1) * height, self.rows, rounding_mode="floor")
        x_edges = torch.div(torch.arange(self.cols + 1) * width, self.cols, rounding_mode="floor")
        r, c = self.cells[:, 0], self.cells[:, 1]
        return torch.stack([y_edges[r], x_edges[c], y_edges[r + 1], x_edges[c + 1]], dim=1)

    def cell_index_map(self) -> Int[Tensor, "height width"]:
        """For every pixel, the index of the token whose box contains it."""
        height, width = self.image_size
        rows = torch.div(torch.arange(height) * self.rows, height, rounding_mode="floor")
        cols = torch.div(torch.arange(width) * self.cols, width, rounding_mode="floor")
        return rows[:, None] * self.cols + cols[None, :]


@dataclass(frozen=True)
class ImageSpan:
    """One image inside one batch row."""

    row: int  # batch row of the sequence
    image_index: int  # index of the image in `pixel_values`
    positions: Int[Tensor, "n_tokens"]  # sequence positions of the grid tokens, raster order
    cls_position: int | None  # sequence position of the image's CLS token, if the LLM sees it
    # every non-grid token of the image the LLM sees before its grid (CLS, registers), in order
    prefix_positions: Int[Tensor, "n_prefix"] = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


@dataclass(frozen=True)
class ImageTokenLayout:
    """Per batch row, the image tokens' positions, grid cells and pixel boxes (LLM and vision)."""

    token_grid: TokenGrid  # the LLM's image tokens
    patch_grid: TokenGrid  # the vision encoder's patches
    patch_positions: Int[Tensor, "n_patches"]  # index of each patch in the vision sequence
    patch_to_token: Int[Tensor, "n_patches"]  # grid token fed by each vision patch
    images: tuple[tuple[ImageSpan, ...], ...]  # per batch row, its images in order
    seq_len: int
    adapter_positions: Int[Tensor, "n_tokens"]  # index of each grid token in the adapter's output per image
    vision_seq_len: int  # length of one image's vision sequence (CLS, registers and patches)

    @property
    def grid(self) -> tuple[int, int]:
        return self.token_grid.shape

    @property
    def batch_size(self) -> int:
        return len(self.images)

    @property
    def n_images(self) -> int:
        return sum(len(row) for row in self.images)

    @property
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

    def by_image(self, values: Tensor) -> Tensor:
        """`values` laid out [batch, seq, ...] (a token mask, activations) taken at each image's
        grid tokens: [n_images, n_tokens, ...], images in `pixel_values` order."""
        spans = self.spans
        if not spans:
            return values.new_zeros((0, len(self.token_grid), *values.shape[2:]))
        rows = torch.tensor([s.row for s in spans], device=values.device)
        positions = torch.stack([s.positions for s in spans]).to(values.device)
        return values[rows[:, None], positions]

    def gather(self, stage: Stage, activation: Tensor) -> Float[Tensor, "n_images n_tokens ..."]:
        """A stage's activation at the image's grid tokens, image by image in `pixel_values` order.

        Vision activations are [n_images, vision_seq, ...] and come back at the patches (CLS and
        registers left out, `patch_grid` order); adapter activations are [n_images,
        adapter_tokens, ...] and LLM ones [batch, seq, ...], both back on the LLM `token_grid`.
        """
        if stage == "vision":
            return activation[:, self.patch_positions.to(activation.device)]
        if stage == "adapter":
            return activation[:, self.adapter_positions.to(activation.device)]
        if stage == "llm":
            return self.by_image(activation)
        raise ValueError(f"stage must be 'vision', 'adapter' or 'llm', got {stage!r}")

    def grid_of(self, stage: Stage) -> TokenGrid:
        """The grid `gather(stage, ...)` rows live on."""
        return self.patch_grid if stage == "vision" else self.token_grid

    def scatter_adapter(
        self, selected: Bool[Tensor, "batch seq"], n_adapter: int | None = None
    ) -> Bool[Tensor, "n_images adapter_tokens"]:
        """A [batch, seq] selection of image tokens as the same selection of the adapter's output
        (`n_adapter` tokens per image; by default up to the last grid token)."""
        if n_adapter is None:
            n_adapter = int(self.adapter_positions.max()) + 1 if len(self.adapter_positions) else 0
        out = torch.zeros(self.n_images, n_adapter, dtype=torch.bool)
        for span in self.spans:
            out[span.image_index, self.adapter_positions] = selected[span.row, span.positions].cpu()
        return out

    def scatter_vision(self, selected: Bool[Tensor, "batch seq"]) -> Bool[Tensor, "n_images vision_seq"]:
        """A [batch, seq] selection of image tokens as a selection of the vision patches feeding them."""
        out = torch.zeros(self.n_images, self.vision_seq_len, dtype=torch.bool)
        for span in self.spans:
            out[span.image_index, self.patch_positions] = selected[span.row, span.positions].cpu()[self.patch_to_token]
        return out

    def image_of_position(self) -> Int[Tensor, "batch seq"]:
        """For every position, which image of its row it belongs to (0, 1, ...; CLS and registers
        included) or -1."""
        out = torch.full((self.batch_size, self.seq_len), -1, dtype=torch.long)
        for row in self.images:
            for k, span in enumerate(row):
                out[span.row, span.positions] = k
                out[span.row, span.prefix_positions] = k
        return out

    def image_token_mask(self) -> Bool[Tensor, "batch seq"]:
        """True at every image grid token (CLS tokens excluded)."""
        mask = torch.zeros(self.batch_size, self.seq_len, dtype=torch.bool)
        for row in self.images:
            for span in row:
                mask[span.row, span.positions] = True
        return mask

    def repeat(self, k: int) -> "ImageTokenLayout":
        """The layout of the batch repeated `k` times, replica-major (see `MultimodalInputs.repeat`)."""
        b, n = self.batch_size, self.n_images
        rows = tuple(
            tuple(replace(s, row=s.row + r * b, image_index=s.image_index + r * n) for s in row)
            for r in range(k) for row in self.images
        )
        return replace(self, images=rows)

    def same_geometry(self, other: "ImageTokenLayout") -> bool:
        """True when both layouts put the same images at the same positions (for patching)."""
        if (self.token_grid, self.patch_grid, self.seq_len) != (
            other.token_grid,
            other.patch_grid,
            other.seq_len,
        ) or [len(r) for r in self.images] != [len(r) for r in other.images]:
            return False
        return all(
            torch.equal(a.positions, b.positions) and torch.equal(a.prefix_positions, b.prefix_positions)
            for ra, rb in zip(self.images, other.images)
            for a, b in zip(ra, rb)
        )


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
    """Find every image's tokens in `input_ids`.

    Each image contributes `llm_prefix` (CLS and register tokens; by default `llm_sees_cls`)
    and then `len(token_grid)` consecutive placeholder tokens; a
    run of placeholders is split into images of that size, and images are numbered in row-major
    batch order, which is the order of `pixel_values`.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    tokens_grid = TokenGrid(*token_grid, image_size=image_size)
    patches = TokenGrid(*patch_grid, image_size=image_size)
    llm_prefix = int(llm_sees_cls) if llm_prefix is None else llm_prefix
    per_image = len(tokens_grid) + llm_prefix
    is_image = (input_ids == image_token_id).cpu()
    rows: list[tuple[ImageSpan, ...]] = []
    image_index = 0
    for b in range(input_ids.shape[0]):
        where = torch.nonzero(is_image[b]).flatten()
        if len(where) % per_image:
            raise ValueError(
                f"batch row {b} has {len(where)} image tokens, not a multiple of the {per_image} "
                "tokens one image takes; were the prompts expanded by this model's processor?"
            )
        spans = []
        for start in range(0, len(where), per_image):
            block = where[start : start + per_image]
            if block[-1] - block[0] != per_image - 1:
                raise ValueError(
                    f"batch row {b}: the image tokens at positions {block[0].item()}..."
                    f"{block[-1].item()} are not contiguous"
                )
            cls = int(block[0]) if llm_sees_cls else None
            spans.append(ImageSpan(b, image_index, block[llm_prefix:].clone(), cls, block[:llm_prefix].clone()))
            image_index += 1
        rows.append(tuple(spans))
    n_patches = len(patches)
    return ImageTokenLayout(
        token_grid=tokens_grid,
        patch_grid=patches,
        patch_positions=torch.arange(n_patches) + vision_prefix,
        patch_to_token=patch_to_token,
        images=tuple(rows),
        seq_len=input_ids.shape[1],
        adapter_positions=torch.arange(len(tokens_grid)) + llm_prefix,
        vision_seq_len=n_patches + vision_prefix,
    )
