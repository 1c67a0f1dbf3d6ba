"""Figures of attention interventions: knockout effects per layer, effective attention masks, and
per-token accuracy over the image grid and along raster order.

Knockout curves put each condition (clean, knocked out, control) on one axis of readout sites
with its bootstrap band. The mask figure shows which query -> key edges an edit leaves open,
with the image tokens' span outlined. Position figures colour every grid cell by the probe's
accuracy there, one panel per layer and condition, and plot accuracy against raster position.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor

from .style import interval_band, metric_label

CONDITION_LABELS = {"causal": "causal", "bidirectional": "bidirectional",
                    "causal_probe_on_bidirectional": "causal probes,<br>bidirectional run"}
KNOCKOUT_STYLES = {
    "clean": dict(color="#1f77b4", dash="solid"),
    "anchors": dict(color="#d62728", dash="solid"),
    "control": dict(color="#7f7f7f", dash="dash"),
}
KNOCKOUT_NAMES = {"clean": "no knockout", "anchors": "anchors -> others blocked", "control": "random same-class tokens blocked"}
POSITION_STYLES = {
    "causal": dict(color="#1f77b4", dash="solid"),
    "bidirectional": dict(color="#2ca02c", dash="solid"),
    "causal_probe_on_bidirectional": dict(color="#ff7f0e", dash="dot"),
}


def plot_knockout_effect(result, metric: str = "target_accuracy") -> go.Figure:
    """`metric` ("target_accuracy", "pair_miou", "miou") at every readout site, per condition."""
    table = result.table
    if metric not in table.columns:
        raise ValueError(f"unknown metric {metric!r}; choose from target_accuracy, pair_miou, miou")
    labels = [s.label for s in result.readouts]
    fig = go.Figure()
    for condition, rows in table.groupby("condition", sort=False):
        rows = rows.set_index("hook").loc[[s.hook for s in result.readouts]]
        style = KNOCKOUT_STYLES.get(condition, {})
        x = list(range(len(labels)))
        fig.add_trace(interval_band(x, rows[f"{metric}_low"], rows[f"{metric}_high"], style.get("color", "#444444")))
        fig.add_trace(go.Scatter(x=x, y=rows[metric], mode="lines+markers", line=style,
                                 name=KNOCKOUT_NAMES.get(condition, condition)))
    window = result.layers
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(labels))), ticktext=labels, title="readout site")
    fig.update_yaxes(title=metric_label(metric))
    classes = ", ".join(result.settings.get("classes", []))
    fig.update_layout(
        title=dict(text=f"Anchor knockout in LLM layers {window[0]}-{window[-1]}, reference {result.reference}"
                        f"<br><sup>classes of the conflicting pairs: {classes}</sup>"),
        template="plotly_white", legend=dict(orientation="h", y=-0.25),
    )
    return fig


def plot_attention_mask(mask: Tensor, row: int = 0, inputs=None, title: str | None = None) -> go.Figure:
    """The allowed query -> key edges of one batch row (`mask`: [batch, query, key] bool, e.g.
    `knockout(...).effective_mask()` or `bidirectional_image_attention(...).effective_mask()`).
    With `inputs`, each image's token span is outlined."""
    if mask.ndim != 3:
        raise ValueError(f"mask must be [batch, query, key], got shape {tuple(mask.shape)}")
    if not 0 <= row < mask.shape[0]:
        raise IndexError(f"row must be in 0..{mask.shape[0] - 1}, got {row}")
    allowed = mask[row].cpu().numpy().astype(float)
    fig = go.Figure(go.Heatmap(z=allowed, colorscale=[[0, "#f7f7f7"], [1, "#08519c"]], zmin=0, zmax=1, showscale=False,
                               hovertemplate="query %{y} -> key %{x}: %{z}<extra></extra>"))
    if inputs is not None:
        for span in inputs.layout.images[row]:
            lo, hi = int(span.positions[0]) - 0.5, int(span.positions[-1]) + 0.5
            fig.add_shape(type="rect", x0=lo, x1=hi, y0=lo, y1=hi, line=dict(color="#d62728", width=1.5))
    fig.update_yaxes(autorange="reversed", title="query position", scaleanchor="x")
    fig.update_xaxes(title="key position")
    fig.update_layout(title=title or f"Effective attention mask, row {row} (blue = may attend)", template="plotly_white",
                      width=560, height=560)
    return fig


def plot_position_heatmap(study, layers: list[str] | None = None, conditions: list[str] | None = None) -> go.Figure:
    """Per-token accuracy over the image grid: one row of panels per condition, one column per site."""
    grid = study.grid
    table = study.per_position
    sites = layers or list(dict.fromkeys(table.site))
    present = list(dict.fromkeys(table.condition))
    conditions = conditions or [c for c in POSITION_STYLES if c in present] + [c for c in present if c not in POSITION_STYLES]
    fig = make_subplots(rows=len(conditions), cols=len(sites), horizontal_spacing=0.02, vertical_spacing=0.06,
                        subplot_titles=sites + [""] * (len(sites) * (len(conditions) - 1)))
    for i, condition in enumerate(conditions, start=1):
        for j, site in enumerate(sites, start=1):
            rows = table[(table.condition == condition) & (table.site == site)].sort_values("position")
            z = rows.accuracy.to_numpy().reshape(grid)
            fig.add_trace(go.Heatmap(z=z, zmin=0, zmax=1, colorscale="Viridis", showscale=(i, j) == (1, len(sites)),
                                     colorbar=dict(title="accuracy"),
                                     hovertemplate="row %{y}, col %{x}: %{z:.3f}<extra></extra>"), row=i, col=j)
            fig.update_yaxes(autorange="reversed", showticklabels=False, scaleanchor=f"x{(i - 1) * len(sites) + j}",
                             row=i, col=j)
            fig.update_xaxes(showticklabels=False, row=i, col=j)
        fig.update_yaxes(title=CONDITION_LABELS.get(condition, condition), row=i, col=1)
    fig.update_layout(title="Probe accuracy of each image token over the grid (raster order starts top left)",
                      template="plotly_white", height=240 * len(conditions) + 80, width=200 * len(sites) + 200)
    return fig


def plot_position_curve(study, site: str | None = None, by: str = "row") -> go.Figure:
    """Accuracy against raster position at one site, per condition, with bootstrap bands.
    `by="row"` averages each grid row (less noisy); `by="token"` plots every position."""
    if by not in ("row", "token"):
        raise ValueError(f"by must be 'row' or 'token', got {by!r}")
    curves = study.position_curves(site, by=by)
    site = curves.site.iloc[0]
    fig = go.Figure()
    for condition, rows in curves.groupby("condition", sort=False):
        style = POSITION_STYLES.get(condition, {})
        x = list(rows.bin)
        fig.add_trace(interval_band(x, rows.low, rows.high, style.get("color", "#444444")))
        fig.add_trace(go.Scatter(x=x, y=rows.accuracy, mode="lines+markers", line=style,
                                 name=CONDITION_LABELS.get(condition, condition).replace("<br>", " ")))
    fig.update_xaxes(title="grid row (raster order)" if by == "row" else "raster position of the image token")
    fig.update_yaxes(title="token accuracy")
    fig.update_layout(title=f"Accuracy along raster order at {site}", template="plotly_white",
                      legend=dict(orientation="h", y=-0.25))
    return fig


__all__ = ["plot_attention_mask", "plot_knockout_effect", "plot_position_curve", "plot_position_heatmap"]
