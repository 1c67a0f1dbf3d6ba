"""The report's feature page: one figure per SAE feature, with what it fires on and what it matches.

Top row: each held-out image where the feature fires most, beside the feature's activation painted
over the same canvas (one colour scale per feature, from zero to its largest value shown); bottom
row: the crops at the feature's most active tokens, titled with the activation there and the
image. The title gives the feature's best class and its training IoU (which chose it) and its
held-out IoU with 95% interval (which scores it). Cards
come from `mmlens.sae.feature_page.feature_cards`; nothing here runs a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .sae_plots import add_heatmap

if TYPE_CHECKING:
    from ..sae.feature_page import FeatureCard

FEATURE_PAGE_HOW_TO_READ = (
    "One SAE feature: top, the held-out images where it fires most, each beside the feature's activation painted "
    "over its pixels (each token's value fills its pixel box; one colour scale for the feature); bottom, the crops at "
    "its most active tokens with their activations. The title names the class whose mask the feature's map matches "
    "best on training images (IoU of the map where the feature fires with the class mask), which is also how the "
    "page's features were chosen and ordered, then the same IoU on held-out images with its 95% bootstrap interval "
    "over those images, which chose nothing. A feature that fires on one shape across "
    "images, and little elsewhere, is a class detector; one that fires on a colour or on edges is not."
)


def card_title(card: "FeatureCard") -> str:
    return (f"SAE feature {card.feature}: best class {card.best_class} (training IoU {card.train_iou:.3f}), "
            f"held-out IoU {card.iou:.3f} [{card.iou_low:.3f}, {card.iou_high:.3f}]")


def plot_feature_card(card: "FeatureCard") -> go.Figure:
    """The card of one feature as a figure (see the module's description)."""
    cols = max(2 * len(card.maps), len(card.crops), 1)
    titles = [""] * (2 * cols)
    for n, row in enumerate(card.rows):
        titles[2 * n], titles[2 * n + 1] = f"image {row}", f"feature {card.feature}"
    for n, (value, row) in enumerate(zip(card.crop_activations, card.crop_rows)):
        titles[cols + n] = f"{value:.2f} at image {row}"
    fig = make_subplots(rows=2, cols=cols, subplot_titles=titles, horizontal_spacing=0.02, vertical_spacing=0.12)
    peak = max([float(np.nanmax(m)) for m in card.maps if np.isfinite(m).any()] or [0.0]) or 1.0
    for n, (picture, values) in enumerate(zip(card.pictures, card.maps)):
        fig.add_trace(go.Image(z=np.asarray(picture)), row=1, col=2 * n + 1)
        add_heatmap(fig, np.asarray(values, dtype=float), 2 * n + 2, "Viridis", showscale=n == 0, row=1,
                    zmin=0.0, zmax=peak)
    for n, crop in enumerate(card.crops):
        fig.add_trace(go.Image(z=np.asarray(crop)), row=2, col=n + 1)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(title=card_title(card), template="plotly_white", height=520, width=200 * cols + 80)
    return fig


def feature_page_table(cards: list["FeatureCard"]) -> pd.DataFrame:
    """One row per card: the feature, its best class, training IoU (which ranks the page), held-out
    IoU with interval, images drawn."""
    return pd.DataFrame([{"feature": c.feature, "class": c.best_class, "train_iou": c.train_iou, "iou": c.iou,
                          "iou_low": c.iou_low,
                          "iou_high": c.iou_high, "images": ", ".join(map(str, c.rows)),
                          "top_activation": max(c.crop_activations, default=0.0)} for c in cards])


__all__ = ["FEATURE_PAGE_HOW_TO_READ", "card_title", "feature_page_table", "plot_feature_card"]
