"""LLaVA-NeXT (LlavaNextForConditionalGeneration): "anyres" tiles, a base image and row newlines.

The processor picks the best grid resolution for each image (`select_best_resolution`), resizes the
image into it keeping its aspect, pads the rest, and cuts it into tower-sized tiles; a squashed copy
of the whole image (the base image) comes first. The tower and projector run on every tile as a batch
([n_tiles, patches, d]); the model then joins the tiles' features into one grid, removes the rows or
columns that only saw padding (`unpad_image`) and appends the learned `image_newline` after every row.
So each image is two segments on its original pixels: the base grid, then the unpadded tile grid
(row newlines recorded as special tokens), and its token count depends on its size (`image_sizes`).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from ....errors import InputError, LayoutMismatchError, UnsupportedModelError
from ...config import MLLMConfig
from ...images.layout import GridCells, ImageSpan, ImageTokenLayout, Segment, image_runs
from ...images.preprocess import MaskGeometry
from ..anyres import AnyresTiling, anyres_tiling, edges_back, geometry_for, patch_px
from ..llava import Llava


class LlavaNext(Llava):
    hf_class_names = ("LlavaNextForConditionalGeneration",)
    extra_input_names = ("image_sizes",)
    vision_towers = ("clip_vision_model",)  # "default" drops the first token: the tower needs a CLS

    def check_supported(self, hf_model: nn.Module) -> None:
        super().check_supported(hf_model)
        config = hf_model.config
        if config.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                f"{type(hf_model).__name__} with vision_feature_select_strategy="
                f"{config.vision_feature_select_strategy!r}: the tiles' features only form a grid without the CLS token"
            )

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        self.pinpoints = [list(p) for p in hf_model.config.image_grid_pinpoints]
        return super().build_config(hf_model)

    def mask_geometry(self, processor: Any) -> MaskGeometry:
        return geometry_for(processor)

    def geometry(self, cfg: MLLMConfig, size: tuple[int, int]) -> AnyresTiling:
        return anyres_tiling(size, self.pinpoints, cfg.vision.image_size, cfg.vision.patch_size)

    def _sizes(self, image_sizes: Tensor | None, n_images: int) -> list[tuple[int, int]]:
        if image_sizes is None:
            raise InputError("LLaVA-NeXT needs image_sizes (the original (height, width) of every image); "
                             "use model.prepare(...) or pass the processor's image_sizes")
        sizes = [tuple(int(v) for v in s) for s in torch.as_tensor(image_sizes).tolist()]
        if len(sizes) != n_images:
            raise InputError(f"{len(sizes)} image_sizes for {n_images} image(s)")
        return sizes

    # ------------------------------------------------------------- images -> tokens
    def tiled(self, inputs: dict[str, Tensor], n_rows: int) -> list[bool]:
        """Per batch row, whether its images are tiled (LLaVA-NeXT: always)."""
        return [True] * n_rows

    def image_extent(self, cfg: MLLMConfig, size: tuple[int, int], tiled: bool) -> tuple[int, int]:
        """(LLM tokens, tower inputs) of one image: base grid + unpadded rows with their newlines, tiles + 1."""
        geo = self.geometry(cfg, size)
        g = cfg.vision.image_size // cfg.vision.patch_size
        return g * g + geo.n_tokens, geo.n_tiles

    def image_span(self, cfg: MLLMConfig, row: int, index: int, block: Tensor, size: tuple[int, int], tiled: bool,
                   tile0: int) -> ImageSpan:
        """The image's segments: the base grid then the unpadded tile grid, each row ended by a newline."""
        geo = self.geometry(cfg, size)
        g = cfg.vision.image_size // cfg.vision.patch_size
        prefix = self.vision_prefix_tokens(cfg)
        height, width = geo.size
        patch = patch_px(geo, g)
        segments = [self.base_segment(cfg, block, tile0, size)]
        rows_u, cols_u = geo.kept.shape
        full_cols = geo.tile_grid[1] * g
        feature_row, feature_col = geo.kept[:, 0] // full_cols, geo.kept[0] % full_cols
        pad_top, pad_left = (geo.best[0] - geo.resized[0]) // 2, (geo.best[1] - geo.resized[1]) // 2
        grid = GridCells(edges_back(feature_row, patch, pad_top, geo.resized[0], height),
                         edges_back(feature_col, patch, pad_left, geo.resized[1], width))
        r, c = feature_row[:, None].expand(rows_u, cols_u).flatten(), feature_col[None, :].expand(rows_u, cols_u).flatten()
        tiles = tile0 + 1 + (r // g) * geo.tile_grid[1] + c // g  # tile 0 is the base image
        within = (r % g) * g + c % g
        body = block[g * g :].view(rows_u, cols_u + 1)
        segments.append(Segment("tiles", grid, body[:, :cols_u].flatten().clone(), (tiles, within),
                                grid, (tiles, within + prefix), torch.arange(rows_u * cols_u)))
        return ImageSpan(row, index, tuple(segments), (height, width), {"newline": body[:, cols_u].clone()})

    def base_segment(self, cfg: MLLMConfig, block: Tensor, tile: int, size: tuple[int, int],
                     edges: tuple[Tensor, Tensor] | None = None) -> Segment:
        """The first g x g tokens of `block`: tower input `tile` (the whole image squashed into one
        tile, unless `edges` say where its cells lie)."""
        g = cfg.vision.image_size // cfg.vision.patch_size
        if edges is None:
            cells, patch = torch.arange(g), cfg.vision.patch_size
            edges = (edges_back(cells, patch, 0, g * patch, size[0]), edges_back(cells, patch, 0, g * patch, size[1]))
        grid, base = GridCells(*edges), torch.arange(g * g)
        which = torch.full((g * g,), tile)
        return Segment("base", grid, block[: g * g].clone(), (which, base), grid,
                       (which, base + self.vision_prefix_tokens(cfg)), base)

    def layout(self, cfg: MLLMConfig, input_ids: Int[Tensor, "batch seq"], **inputs: Tensor) -> ImageTokenLayout:
        g = cfg.vision.image_size // cfg.vision.patch_size
        runs = image_runs(input_ids, cfg.image_token_id)
        given = inputs.get("image_sizes")
        sizes = [] if given is None else self._sizes(given, len(given))
        tiled = self.tiled(inputs, len(runs))
        rows, k, tile0 = [], 0, 0
        for b, where in enumerate(runs):
            spans, used = [], 0
            while used < len(where):
                if k >= len(sizes):
                    raise LayoutMismatchError(f"batch row {b} has image tokens beyond the {len(sizes)} image(s) whose "
                                              "image_sizes were given (this family's layout needs image_sizes)")
                n, n_tiles = self.image_extent(cfg, sizes[k], tiled[b])
                block = where[used : used + n]
                if len(block) < n or block[-1] - block[0] != n - 1:
                    raise LayoutMismatchError(
                        f"batch row {b}: image {k} of size {sizes[k]} takes {n} contiguous image tokens, found "
                        f"{len(block)} from position {int(block[0])}; were the prompts expanded by this model's processor?"
                    )
                spans.append(self.image_span(cfg, b, k, block, sizes[k], tiled[b], tile0))
                used, k, tile0 = used + n, k + 1, tile0 + n_tiles
            rows.append(tuple(spans))
        if k != len(sizes):
            raise LayoutMismatchError(f"{len(sizes)} image(s) but image tokens for {k} in input_ids")
        prefix = self.vision_prefix_tokens(cfg)
        return ImageTokenLayout(tuple(rows), input_ids.shape[1], (tile0, prefix + g * g), (tile0, g * g))

    def check_inputs(self, cfg: MLLMConfig, input_ids: Tensor, pixel_values: Tensor | None, **inputs: Tensor) -> None:
        if pixel_values is None:
            if (input_ids == cfg.image_token_id).any():
                raise InputError("image tokens in input_ids but no pixel_values")
            return
        tile = cfg.vision.image_size
        if pixel_values.ndim != 5 or tuple(pixel_values.shape[2:]) != (3, tile, tile):
            raise InputError(
                f"pixel_values have shape {tuple(pixel_values.shape)} but this model takes [n_images, n_tiles, 3, "
                f"{tile}, {tile}]; preprocess images with model.prepare(...)"
            )
        sizes = self._sizes(inputs.get("image_sizes"), pixel_values.shape[0])
        try:  # the layout walks the placeholders image by image, as the model will
            self.layout(cfg, input_ids, **inputs)
        except LayoutMismatchError as error:
            raise InputError(f"{len(sizes)} image(s) of sizes {sizes} and the prompts' placeholders do not match: "
                             f"{error}") from None

    def probe_inputs(self, cfg: MLLMConfig, seed: int = 0) -> dict[str, Tensor]:
        """Two rows, one image each, of two different shapes (wide and tall tile grids)."""
        generator = torch.Generator().manual_seed(seed)
        tile = cfg.vision.image_size
        sizes = [tuple(self.pinpoints[0]), tuple(self.pinpoints[-1])]
        extents = [self.image_extent(cfg, s, True) for s in sizes]
        pixels = torch.randn(2, max(t for _, t in extents), 3, tile, tile, generator=generator)
        text = [t for t in range(min(cfg.d_vocab, 16)) if t != cfg.image_token_id][:4]
        rows = [[cfg.image_token_id] * n + text for n, _ in extents]
        length = max(len(r) for r in rows)
        ids = torch.tensor([[text[0]] * (length - len(r)) + r for r in rows])  # no padding: repeated text
        return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids),
                "image_sizes": torch.tensor(sizes)}
