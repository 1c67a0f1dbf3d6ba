"""A feature's activation painted over the image, through the inputs' token layout.

An SAE spliced with its error term leaves the forward unchanged while its feature activations
(`<point>.hook_sae_acts_post`) are read at every image's grid tokens with `layout.gather`, so one
function serves a vision-stage SAE (the patch grid) and an adapter or LLM SAE (the LLM's image
tokens), for a fixed grid or per-image tiles alike. Each segment (the grid, a base image, its
tiles) comes back as a [rows, cols] map, and the layout's `PixelMap` paints every token's value
over its pixel box on the image's canvas, as feature visualisations over the patch grid do
(ViT-Prisma's SAE maps; Bricken et al. 2023 for the features). Tokens without a grid cell (CLS,
registers, row newlines, image markers) are left out by kind and counted in `left_out`; images
that reach the LLM as learned queries have no cells there and the layout refuses them by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..errors import InputError
from ..model.images.layout import TokenTable
from ..model.images.pixel_map import PixelMap
from ..probing.sites import Site, gather_image_tokens, site_for, site_layout
from .sae import SAE

if TYPE_CHECKING:
    from ..model import HookedMLLM, MultimodalInputs

FEATURES_POINT = "hook_sae_acts_post"


@dataclass(frozen=True, eq=False)
class SegmentMap:
    """One segment of one image: its kind ("grid", "base", "tiles" ...) and every chosen feature's
    activation on its grid of cells, [features, rows, cols]."""

    kind: str
    values: Float[Tensor, "features rows cols"]


@dataclass(frozen=True, eq=False)
class FeatureMaps:
    """Chosen features of an SAE at the image tokens of a batch.

    `activations` holds `layout.gather` rows (image by image, zero-padded; `table.present` marks
    the real ones), `segments` per image its `SegmentMap`s in sequence order, `pixels` the
    `PixelMap` that paints rows onto canvas pixels, and `left_out` how many activation rows of
    each kind have no grid cell and were not drawn (CLS, registers, newlines ...)."""

    hook_name: str
    stage: str
    features: tuple[int, ...]
    activations: Float[Tensor, "n_images n_tokens features"]
    table: TokenTable
    pixels: PixelMap
    segments: tuple[tuple[SegmentMap, ...], ...]
    left_out: dict[str, int]

    @property
    def present(self) -> Bool[Tensor, "n_images n_tokens"]:
        return self.table.present

    def column(self, feature: int) -> int:
        if feature not in self.features:
            raise InputError(f"feature {feature} was not mapped; mapped: {list(self.features)}")
        return self.features.index(feature)

    def painted(self, feature: int) -> Float[Tensor, "n_images height width"]:
        """The feature over every canvas pixel of every image (canvases padded to the largest):
        each pixel takes the value of the token whose box covers it (the finer segment where a
        tile lies over its base image), NaN where no token covers it."""
        return paint_values(self.pixels, self.activations[..., self.column(feature)])

    def figure(self, image: int = 0, features: Sequence[int] | None = None, picture: Any = None):
        """A plotly figure of image `image`: the picture on its canvas (when given: a PIL image
        or an array, see `canvas_picture`) and each feature painted over the canvas."""
        from ..viz.sae_plots import plot_feature_maps

        if not 0 <= image < len(self.segments):
            raise IndexError(f"image must be in 0..{len(self.segments) - 1}, got {image}")
        chosen = list(self.features if features is None else features)
        height, width = (int(v) for v in self.table.canvas[image])
        painted = {f: self.painted(f)[image, :height, :width].numpy() for f in chosen}
        return plot_feature_maps(painted, picture=picture, title=f"{self.hook_name}: features on image {image}")


def feature_activations(
    model: "HookedMLLM", sae: SAE, inputs: "MultimodalInputs", features: Sequence[int] | None = None
) -> tuple[Site, Float[Tensor, "n_images n_tokens features"]]:
    """The site the SAE reads and its features' activations at every image's grid tokens, from
    one forward with the SAE spliced with its error term (the model's outputs unchanged)."""
    site = site_for(model, _hook_name(sae))
    chosen = checked_features(sae, features)
    check_grid_tokens(site_layout(site, inputs.layout), site.stage)
    name = f"{site.hook}.{FEATURES_POINT}"
    with torch.no_grad():
        _, cache = model.run_with_cache_with_saes(inputs, saes=[sae], use_error_term=True, names_filter=[name])
    acts = cache[name][..., list(chosen)]
    return site, gather_image_tokens(site, acts, inputs.layout).detach().cpu()


def feature_maps(
    model: "HookedMLLM", sae: SAE, inputs: "MultimodalInputs", features: Sequence[int]
) -> FeatureMaps:
    """`features` of `sae` drawn on every image of `inputs`: per image and segment a [rows, cols]
    map, the painted canvas (`FeatureMaps.painted`) and a figure (`FeatureMaps.figure`)."""
    site, acts = feature_activations(model, sae, inputs, features)
    layout = site_layout(site, inputs.layout)  # a second tower's site (SAM's) is drawn on its own patch grid
    table = layout.table(site.stage)
    segments = []
    for k, span in enumerate(layout.spans):
        maps = []
        for s, segment in enumerate(span.segments):
            grid = segment.patches if site.stage == "vision" else segment.tokens
            rows = table.segment[k] == s
            values = torch.zeros(len(features), *grid.shape)
            cells = table.cells[k][rows]
            values[:, cells[:, 0], cells[:, 1]] = acts[k][rows].T
            maps.append(SegmentMap(segment.kind, values))
        segments.append(tuple(maps))
    return FeatureMaps(site.hook, site.stage, tuple(int(f) for f in features), acts, table,
                       layout.pixels(site.stage), tuple(segments), _left_out(layout, site, table))


def canvas_picture(model: "HookedMLLM", image: Any) -> np.ndarray:
    """An image as the canvas its token boxes live in ([height, width, 3] uint8): each channel
    follows the processor's resize, crop and pad exactly as a label mask does
    (`model.transform_mask`, nearest neighbour), so a crop at a token's box shows what it covers."""
    channels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    return np.stack([model.transform_mask(channels[..., c], ignore_index=255) for c in range(3)], -1).astype(np.uint8)


def paint_values(pixels: PixelMap, values: Float[Tensor, "*lead n_images n_tokens"]) -> Float[Tensor, "*lead n_images height width"]:
    """Per-token values (`layout.gather` rows) over every canvas pixel, NaN where no token paints:
    the map paints each pixel's row index, so any layout kind and any dtype paint alike."""
    n_images, n_tokens = values.shape[-2:]
    row_under = pixels.paint(torch.arange(n_tokens).expand(n_images, -1))
    flat = values.float().reshape(-1, n_images, n_tokens)
    if not n_tokens:
        return torch.full((*values.shape[:-2], *row_under.shape), float("nan"))
    index = row_under.clamp(min=0).flatten(1).expand(len(flat), -1, -1)
    under = flat.gather(2, index).view(*values.shape[:-2], *row_under.shape)
    return torch.where(row_under >= 0, under, torch.full_like(under, float("nan")))


def check_grid_tokens(layout: Any, stage: str) -> None:
    """Refuse, before any forward, a stage whose image tokens have no grid cells in this layout
    (learned queries at the adapter and LLM): the layout's own `gather` names what to read instead."""
    shapes = {"vision": layout.vision_shape, "adapter": layout.adapter_shape, "llm": (layout.batch_size, layout.seq_len)}
    layout.gather(stage, torch.zeros(*shapes[stage], 0))


def checked_features(sae: SAE, features: Sequence[int] | None) -> tuple[int, ...]:
    """`features` (default: all) as indices of `sae`, refused by name when out of range."""
    chosen = tuple(range(sae.cfg.d_sae)) if features is None else tuple(int(f) for f in features)
    bad = [f for f in chosen if not 0 <= f < sae.cfg.d_sae]
    if not chosen or bad:
        raise InputError(f"features {bad or 'none'} are not features of this SAE: choose indices in 0..{sae.cfg.d_sae - 1}")
    return chosen


def _hook_name(sae: SAE) -> str:
    if not isinstance(sae, SAE):
        raise InputError(f"expected an mmlens SAE, got {type(sae).__name__}: convert it with mmlens.load_sae")
    if sae.cfg.is_transcoder:
        raise InputError("a transcoder's features are read where its input is; draw maps from an SAE, or splice the "
                         "transcoder and read <hook_name>.hook_sae_acts_post yourself")
    return sae.cfg.hook_name


def _left_out(layout: Any, site: Site, table: TokenTable) -> dict[str, int]:
    """Rows of the site's activation that are image tokens without a grid cell, by kind."""
    if site.stage == "vision":
        extra = prod(layout.vision_shape) - int(table.present.sum())
        return {"vision positions without a patch cell (CLS, registers, patches unpadding drops)": extra} if extra else {}
    counts: dict[str, int] = {}
    for span in layout.spans:
        for kind, positions in span.special.items():
            counts[kind] = counts.get(kind, 0) + len(positions)
    return counts
