"""An SAE study's features laid out for a reader: per feature, where it fires and what it matches.

The features shown are those best aligned with a class on TRAINING images (highest training IoU of
the feature's thresholded map with the class mask, `sae_study`'s alignment table, where each
class's feature is also chosen on training images); each is then scored, and its IoU shown with an
interval, on the held-out images, which therefore choose nothing. Ranking by the held-out IoU
would select on the very images that score the features and make the shown IoUs optimistic. For
each feature, the held-out images where it fires most are drawn with the feature painted over the
canvas through the token layout (none when it fires on no held-out image), and the crops at its
most active token (`top_activations`); every value shown is the feature's activation from
a forward with the SAE spliced with its error term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import InputError
from .maps import canvas_picture, feature_maps
from .top_activations import _picture, top_activations

if TYPE_CHECKING:
    from ..model import HookedMLLM
    from .study import SAEStudy


@dataclass(frozen=True, eq=False)
class FeatureCard:
    """One feature: its best class with the training IoU that chose it and the held-out IoU with
    its 95% interval, the dataset rows of the images drawn, each image's canvas picture and the
    feature painted over it ([height, width], NaN where no token covers a pixel), and the top crops
    with their activations and rows."""

    feature: int
    best_class: str
    train_iou: float
    iou: float
    iou_low: float
    iou_high: float
    rows: list[int]
    pictures: list[np.ndarray]
    maps: list[np.ndarray]
    crops: list[np.ndarray]
    crop_activations: list[float]
    crop_rows: list[int]


def top_aligned_features(alignment: pd.DataFrame, n: int) -> pd.DataFrame:
    """Each feature once, at its best class by TRAINING IoU, best first; the first `n`. The held-out
    columns (`iou` and its interval) choose nothing: they score what the training images chose."""
    if n < 1:
        raise InputError(f"n_features must be at least 1, got {n}")
    ranked = alignment.sort_values(["train_iou", "feature"], ascending=[False, True], kind="stable")
    return ranked.drop_duplicates("feature").head(n).reset_index(drop=True)


def feature_cards(model: "HookedMLLM", study: "SAEStudy", scenes: Any, *, n_features: int = 6, n_images: int = 3,
                  n_crops: int = 4, prompt: str = "", batch_size: int = 8) -> list[FeatureCard]:
    """The cards of the `n_features` best-aligned features of `study` (run on `scenes`), each drawn
    on the `n_images` held-out images where it fires most, with its `n_crops` top crops."""
    if n_images < 1 or n_crops < 1:
        raise InputError(f"n_images and n_crops must be at least 1, got {n_images} and {n_crops}")
    chosen = top_aligned_features(study.alignment, n_features)
    held_out = [int(row) for row in study.test_rows]
    images = [_picture(scenes[row]) for row in held_out]
    top = top_activations(model, study.sae, images, chosen.feature.tolist(), prompt=prompt,
                          k=max(n_images, n_crops), batch_size=batch_size)
    cards = []
    for entry in chosen.to_dict("records"):  # "class" is a column: records, not itertuples
        feature = int(entry["feature"])
        found = top[feature]
        drawn = [hit.image for hit in found[:n_images]]
        pictures, maps = [], []
        if drawn:
            inputs = model.prepare([images[i] for i in drawn], [prompt] * len(drawn))
            painted = feature_maps(model, study.sae, inputs, [feature])
            for n, i in enumerate(drawn):
                height, width = (int(v) for v in painted.table.canvas[n])
                pictures.append(canvas_picture(model, images[i]))
                maps.append(painted.painted(feature)[n, :height, :width].numpy())
        crops = found[:n_crops]
        cards.append(FeatureCard(feature, str(entry["class"]), float(entry["train_iou"]), float(entry["iou"]),
                                 float(entry["iou_low"]),
                                 float(entry["iou_high"]), [held_out[i] for i in drawn], pictures, maps,
                                 [hit.crop for hit in crops], [hit.activation for hit in crops],
                                 [held_out[hit.image] for hit in crops]))
    return cards
