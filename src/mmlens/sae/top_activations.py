"""Top-activating images and crops of SAE features over a dataset of images.

The usual first look at a dictionary feature (Bricken et al. 2023; Templeton et al. 2024): the
inputs where it fires most. On images each image counts once, at its most active grid token, and
the crop is that token's pixel box on the image's canvas (the site's `layout.table(stage).boxes`): the
patch of a vision-stage SAE (of its own tower: SAM's finer patches at `vision.high_res.*`), the LLM token's cell (a merged or tiled one where the family merges or
tiles) of an adapter or LLM SAE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import InputError
from ..probing.sites import site_layout
from .maps import canvas_picture, feature_activations
from .sae import SAE

if TYPE_CHECKING:
    from ..model import HookedMLLM


@dataclass(frozen=True)
class TopActivation:
    """One image where a feature fires: its activation at the image's most active token, the
    image's index in the dataset, that token's segment, cell and pixel box (y0, x0, y1, x1) on
    the canvas, and the crop of the canvas picture at the box ([h, w, 3] uint8)."""

    feature: int
    activation: float
    image: int
    segment: int
    cell: tuple[int, int]
    box: tuple[int, int, int, int]
    crop: np.ndarray


def top_activations(
    model: "HookedMLLM",
    sae: SAE,
    images: Sequence[Any],
    features: Sequence[int],
    *,
    prompt: str = "what is in the image ?",
    k: int = 5,
    batch_size: int = 8,
) -> dict[int, list[TopActivation]]:
    """Per feature, the `k` images of `images` (PIL images, or a dataset whose rows hold "image")
    where it fires most, best first; images where it never fires are not listed."""
    if k < 1 or batch_size < 1:
        raise InputError(f"k and batch_size must be at least 1, got k={k}, batch_size={batch_size}")
    best: dict[int, list[tuple[float, int, int, int]]] = {int(f): [] for f in features}  # (value, image, row, batch)
    batches = []
    for start in range(0, len(images), batch_size):
        chosen = [_picture(images[i]) for i in range(start, min(start + batch_size, len(images)))]
        inputs = model.prepare(chosen, [prompt] * len(chosen))
        site, acts = feature_activations(model, sae, inputs, features)
        table = site_layout(site, inputs.layout).table(site.stage)
        acts = torch.where(table.present[..., None], acts, torch.full_like(acts, -torch.inf))
        top, rows = acts.max(1)  # [images, features]: each image's most active token
        for column, feature in enumerate(best):
            for n in range(len(chosen)):
                if top[n, column] > 0:
                    best[feature].append((float(top[n, column]), start + n, int(rows[n, column]), len(batches)))
        batches.append(table)
    out = {}
    for feature, found in best.items():
        out[feature] = []
        for value, image, row, batch in sorted(found, key=lambda t: -t[0])[:k]:
            table = batches[batch]
            n = image - batch * batch_size
            y0, x0, y1, x1 = (int(v) for v in table.boxes[n, row])
            picture = canvas_picture(model, _picture(images[image]))
            out[feature].append(TopActivation(feature, value, image, int(table.segment[n, row]),
                                              tuple(int(v) for v in table.cells[n, row]), (y0, x0, y1, x1),
                                              picture[y0:y1, x0:x1]))
    return out


def _picture(item: Any) -> Any:
    return item["image"] if isinstance(item, dict) else item
