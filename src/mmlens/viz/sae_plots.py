"""Figures of values painted over an image's canvas: SAE features and logit-lens maps.

Each panel is one [height, width] array already painted through the token layout (NaN where no
token covers a pixel), drawn as a heatmap beside the picture on the same canvas, so a tiled
image and a fixed grid read alike. The arrays come from `mmlens.sae.FeatureMaps.painted` and
`mmlens.sae.LensMaps`; nothing here knows the layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots


def plot_feature_maps(painted: Mapping[Any, np.ndarray], picture: np.ndarray | None = None,
                      title: str = "SAE features on the image", colorscale: str = "Viridis") -> go.Figure:
    """One heatmap per entry of `painted` (a label -> [height, width] array: a feature index, a
    layer), after the picture when given; hovering shows the value."""
    titles = (["image"] if picture is not None else []) + [f"feature {k}" if isinstance(k, int) else str(k) for k in painted]
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles, horizontal_spacing=0.02)
    col = 1
    if picture is not None:
        fig.add_trace(go.Image(z=np.asarray(picture)), row=1, col=1)
        col = 2
    for offset, values in enumerate(painted.values()):
        add_heatmap(fig, np.asarray(values, dtype=float), col + offset, colorscale, showscale=offset == len(painted) - 1)
    for c in range(1, len(titles) + 1):
        fig.update_xaxes(showticklabels=False, row=1, col=c)
        fig.update_yaxes(showticklabels=False, row=1, col=c)
    fig.update_layout(title=title, template="plotly_white", height=320, width=220 * len(titles) + 80)
    return fig


def plot_lens_maps(painted: Mapping[str, np.ndarray], text: Mapping[str, np.ndarray] | None = None,
                   picture: np.ndarray | None = None, title: str = "Logit lens over the image") -> go.Figure:
    """The logit lens of one image, one panel per layer: `painted` the value per pixel (the
    probability of a token, or of each cell's top token), `text` the hover label per pixel (the
    top token's string)."""
    fig = plot_feature_maps(painted, picture=picture, title=title, colorscale="Magma")
    if text:
        heatmaps = [trace for trace in fig.data if isinstance(trace, go.Heatmap)]
        for trace, labels in zip(heatmaps, text.values()):
            trace.text = np.asarray(labels, dtype=object)[::-1]
            trace.hovertemplate = "%{text}: %{z:.3f}<extra></extra>"
    return fig


def add_heatmap(fig: go.Figure, values: np.ndarray, col: int, colorscale: str, showscale: bool, row: int = 1,
                zmin: float | None = None, zmax: float | None = None) -> None:
    """A painted [height, width] array as a heatmap in subplot (row, col), upright and square-pixelled."""
    # rows flipped: plotly draws row 0 at the bottom, the image has it on top
    fig.add_trace(go.Heatmap(z=values[::-1], colorscale=colorscale, showscale=showscale, zmin=zmin, zmax=zmax,
                             hovertemplate="%{z:.3f}<extra></extra>"), row=row, col=col)
    anchor = fig.get_subplot(row, col).xaxis.plotly_name.replace("axis", "")
    fig.update_yaxes(scaleanchor=anchor, row=row, col=col)
