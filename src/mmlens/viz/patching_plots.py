"""Figures of patching: layer x head heatmaps and attention recovery maps over the image.

The heatmaps put exact patching and its attribution estimate side by side on one diverging
colour scale (both are in the metric's units), so a head the estimate misjudges stands out. A
recovery map overlays, for one image, where the recovery heads of each layer attend from the
chosen query tokens, on the image the model saw, with anchors circled and queries crossed.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots


def plot_head_heatmaps(exact, attribution=None, *, layers=None, title: str | None = None,
                       value: str = "metric restored") -> go.Figure:
    """Layer x head heatmaps ([layers, heads] arrays) of exact patching and, when given, of
    attribution patching beside it, on one colour scale centred at zero."""
    exact = np.asarray(exact, dtype=float)
    if exact.ndim != 2:
        raise ValueError(f"exact must be [layers, heads], got shape {exact.shape}")
    panels = [("exact patching", exact)]
    if attribution is not None:
        attribution = np.asarray(attribution, dtype=float)
        if attribution.shape != exact.shape:
            raise ValueError(f"attribution {attribution.shape} and exact {exact.shape} must have one shape")
        panels.append(("attribution patching", attribution))
    layers = list(range(exact.shape[0])) if layers is None else list(layers)
    bound = max(float(np.nanmax(np.abs(z))) for _, z in panels) or 1.0
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[name for name, _ in panels], horizontal_spacing=0.08)
    for col, (name, z) in enumerate(panels, start=1):
        fig.add_trace(go.Heatmap(z=z, x=list(range(z.shape[1])), y=layers, zmin=-bound, zmax=bound, zmid=0,
                                 colorscale="RdBu", reversescale=True, showscale=col == len(panels),
                                 colorbar=dict(title=value), name=name,
                                 hovertemplate="layer %{y}, head %{x}: %{z:.4f}<extra>" + name + "</extra>"),
                      row=1, col=col)
        fig.update_xaxes(title="head", dtick=1, row=1, col=col)
        fig.update_yaxes(title="layer" if col == 1 else None, dtick=1, autorange="reversed", row=1, col=col)
    fig.update_layout(title=title or "Patching effect per head", template="plotly_white",
                      width=360 * len(panels) + 120, height=80 * len(layers) + 220)
    return fig


def plot_recovery_map(example, opacity: float = 0.55) -> go.Figure:
    """One panel per layer: the attention of that layer's recovery heads from the query tokens
    (crossed) to every image token, over the image; anchors circled (a `RecoveryMap`)."""
    rows, cols = example.grid
    height, width = example.image.shape[:2]
    cell_h, cell_w = height / rows, width / cols
    layers = sorted(example.attention)
    if not layers:
        raise ValueError("the recovery map has no layer to show")
    titles = [f"L{l} heads {', '.join(map(str, example.heads[l]))}" for l in layers]
    fig = make_subplots(rows=1, cols=len(layers), subplot_titles=titles, horizontal_spacing=0.03)
    bound = max(float(example.attention[l].max()) for l in layers) or 1.0
    centres_y = (np.arange(rows) + 0.5) * cell_h
    centres_x = (np.arange(cols) + 0.5) * cell_w

    def marks(tokens, symbol, colour, name, col):
        tokens = np.asarray(tokens, dtype=int)
        fig.add_trace(go.Scatter(x=centres_x[tokens % cols], y=centres_y[tokens // cols], mode="markers", name=name,
                                 marker=dict(symbol=symbol, size=9, color=colour, line=dict(width=2, color=colour)),
                                 legendgroup=name, showlegend=col == 1, hovertemplate=name + "<extra></extra>"),
                      row=1, col=col)

    for col, layer in enumerate(layers, start=1):
        fig.add_trace(go.Image(z=example.image, hoverinfo="skip"), row=1, col=col)
        fig.add_trace(go.Heatmap(z=example.attention[layer], x=centres_x, y=centres_y, zmin=0, zmax=bound,
                                 colorscale="Hot", opacity=opacity, showscale=col == len(layers),
                                 colorbar=dict(title="attention"),
                                 hovertemplate="row %{y}, col %{x}: %{z:.3f}<extra></extra>"), row=1, col=col)
        if example.anchors:
            marks(example.anchors, "circle-open", "#00e5ff", "anchors", col)
        if example.queries:
            marks(example.queries, "x-thin-open", "#39ff14", "query tokens", col)
        fig.update_xaxes(showticklabels=False, range=[0, width], row=1, col=col)
        fig.update_yaxes(showticklabels=False, range=[height, 0], scaleanchor=f"x{col}", row=1, col=col)
    source = ("tokens wrong at the adapter and right later" if getattr(example, "query_kind", "recovered") == "recovered"
              else "all object tokens (none in this image is wrong at the adapter and right later)")
    fig.update_layout(title=f"Attention recovery map, dataset image {example.dataset_index}<br><sup>where the recovery heads "
                            f"attend from {source}</sup>", template="plotly_white",
                      width=max(520, 260 * len(layers) + 160), height=400, legend=dict(orientation="h", y=-0.1))
    return fig


__all__ = ["plot_head_heatmaps", "plot_recovery_map"]
