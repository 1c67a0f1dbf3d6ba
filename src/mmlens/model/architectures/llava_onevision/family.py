"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): LLaVA-NeXT's tiles with a SigLIP tower.

A row holding one image is tiled as in LLaVA-NeXT (base grid, unpadded tile grid, a newline after
every row). A row holding several images (`batch_num_images`) is not tiled: each image is padded to
a square, resized to one tile, and its grid is followed by one newline. The tower has no CLS token
(the "full" strategy keeps every patch). When an unpadded grid exceeds `anyres_max_N` tiles' worth
of features the model shrinks it by bilinear interpolation, so its tokens are mixtures of features
that no adapter row holds; such images are refused with an error rather than mislabelled.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ....errors import InputError, UnsupportedModelError
from ...config import MLLMConfig
from ...images.layout import ImageSpan
from ..anyres import edges_back
from ..llava_next import LlavaNext


def _square_edges(g: int, patch: int, tile: int, size: int, side: int) -> Tensor:
    """Edges in an image of `size` pixels (one axis) of g features of a `tile`-pixel tile made by
    centring it in a square of `side` pixels (the processor's `pad_to_square`) then resizing."""
    pad = (side - size) // 2
    edges = (edges_back(torch.arange(g), patch, 0, tile, side) - pad).clamp(0, size)
    edges[0], edges[-1] = 0, size
    return edges


class LlavaOnevision(LlavaNext):
    hf_class_names = ("LlavaOnevisionForConditionalGeneration",)
    extra_input_names = ("image_sizes", "batch_num_images")
    images_per_row = True
    vision_towers = ("siglip_vision_model", "clip_vision_model")

    def check_supported(self, hf_model: nn.Module) -> None:
        super(LlavaNext, self).check_supported(hf_model)
        config = hf_model.config
        has_cls = self.tower_kind(hf_model).has_cls
        if config.vision_feature_select_strategy != ("default" if has_cls else "full"):
            raise UnsupportedModelError(
                f"{type(hf_model).__name__} with a {config.vision_config.model_type!r} tower and vision_feature_select_"
                f"strategy={config.vision_feature_select_strategy!r}: the tiles' features form a grid only when the "
                "strategy drops exactly the CLS token the tower has"
            )

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        self.max_tiles = int(hf_model.config.vision_aspect_ratio.strip("anyres_max_"))
        return super().build_config(hf_model)

    def tiled(self, inputs: dict[str, Tensor], n_rows: int) -> list[bool]:
        """Only rows holding a single image are tiled (the model's `need_patching`)."""
        counts = inputs.get("batch_num_images")
        if counts is None:  # as the model: every image is tiled
            return [True] * n_rows
        return [int(n) == 1 for n in torch.as_tensor(counts).tolist()]

    def image_extent(self, cfg: MLLMConfig, size: tuple[int, int], tiled: bool) -> tuple[int, int]:
        g = cfg.vision.image_size // cfg.vision.patch_size
        if not tiled:
            return g * g + 1, 1
        rows, cols = self.geometry(cfg, size).kept.shape
        if math.sqrt(rows * cols / (self.max_tiles * g * g)) > 1.1:
            raise InputError(
                f"an image of size {size} gives a {rows}x{cols} feature grid, more than anyres_max_{self.max_tiles} "
                "allows: the model shrinks it by bilinear interpolation, whose tokens mix features no layout row "
                "holds. Resize the image (or raise vision_aspect_ratio) so it stays within the limit"
            )
        return super().image_extent(cfg, size, tiled)

    def image_span(self, cfg: MLLMConfig, row: int, index: int, block: Tensor, size: tuple[int, int], tiled: bool,
                   tile0: int) -> ImageSpan:
        if tiled:
            return super().image_span(cfg, row, index, block, size, tiled, tile0)
        g, patch, tile = cfg.vision.image_size // cfg.vision.patch_size, cfg.vision.patch_size, cfg.vision.image_size
        side = max(size)
        edges = (_square_edges(g, patch, tile, size[0], side), _square_edges(g, patch, tile, size[1], side))
        base = self.base_segment(cfg, block, tile0, size, edges)
        return ImageSpan(row, index, (base,), size, {"newline": block[g * g :].clone()})
