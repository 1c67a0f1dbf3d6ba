"""Figures of a probe sweep: the drop-off / recovery curve and predicted segmentations.

The curve puts every site on one axis in pipeline order, shades the vision, adapter and LLM
stages, draws the bootstrap interval as a band and overlays the controls. A second vision tower's
sites (the sweep table's `grid`, e.g. DeepSeek-VL hybrid's SAM at `vision.high_res`) get their own
line in the condition's colour: the first tower's line breaks over them rather than running one
tower into the other. Earlier, finer stages of the one tower (FastVLM's) stay on its line. The prediction figure
paints each token's predicted class over its pixel box beside the image and the ground truth,
in the class palette of `mmlens.viz.masks` (row 0 on top, as in the image).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .masks import add_class_legend, mask_heatmap, orient_like_image
from .style import interval_band, metric_label

STAGE_COLOURS = {"vision": "rgba(99, 110, 250, 0.08)", "adapter": "rgba(239, 85, 59, 0.10)", "llm": "rgba(0, 204, 150, 0.08)"}
CONDITION_STYLES = {
    "model": dict(color="#1f77b4", dash="solid"),
    "random_init": dict(color="#7f7f7f", dash="dash"),
    "shuffled_labels": dict(color="#bcbd22", dash="dot"),
    "random_llm": dict(color="#d62728", dash="dashdot"),
    "control_task": dict(color="#9467bd", dash="dot"),
}
SENSITIVITY_CONDITIONS = ("penalty/10", "penalty*10")  # refits at three sites: in the summary table, not the curve


def plot_probe_curve(sweep, metric: str = "miou", title: str | None = None) -> go.Figure:
    """mIoU (or `token_accuracy`, `pixel_accuracy`) per site along the pipeline."""
    table = sweep.table
    if metric not in table.columns:
        raise ValueError(f"unknown metric {metric!r}; choose from miou, token_accuracy, pixel_accuracy")
    fig = go.Figure()
    labels = [s.label for s in sweep.sites]
    for stage in ("vision", "adapter", "llm"):
        depths = [i for i, s in enumerate(sweep.sites) if s.stage == stage]
        if depths:
            fig.add_vrect(x0=min(depths) - 0.5, x1=max(depths) + 0.5, fillcolor=STAGE_COLOURS[stage],
                          line_width=0, annotation_text=stage, annotation_position="top left")
    for condition, rows in table.groupby("condition", sort=False):
        if condition in SENSITIVITY_CONDITIONS:
            continue
        style = CONDITION_STYLES.get(condition, {})
        for tower, runs in _tower_runs(rows.sort_values("depth")).items():
            if metric == "miou":
                for run in runs:
                    fig.add_trace(interval_band(run.depth, run.miou_low, run.miou_high, style.get("color", "#444444"),
                                                f"{condition} 95% interval"))
            fig.add_trace(go.Scatter(
                x=_across(runs, "depth"), y=_across(runs, metric), mode="lines+markers", name=_named(condition, tower),
                line=style, customdata=np.stack([_across(runs, "hook")], axis=-1),
                hovertemplate="%{customdata[0]}<br>%{y:.3f}<extra>" + condition + "</extra>", **_tower_style(tower, runs),
            ))
    if metric == "miou" and "ceiling" in table.columns:
        model_rows = table[table.condition == "model"].sort_values("depth")
        for tower, runs in _tower_runs(model_rows).items():
            fig.add_trace(go.Scatter(
                x=_across(runs, "depth"), y=_across(runs, "ceiling"), mode="lines",
                name=_named("token-resolution ceiling", tower), line=dict(color="#2ca02c", dash="longdash", width=1),
                hovertemplate="best mIoU any probe on this token grid could reach: %{y:.3f}<extra></extra>",
                **_tower_style(tower, runs, markers=False),
            ))
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(labels))), ticktext=labels, title="site (pipeline order)")
    fig.update_yaxes(title=metric_label(metric))
    fig.update_layout(title=title or f"Probe {metric_label(metric)} along vision -> adapter -> LLM", template="plotly_white",
                      legend=dict(orientation="h", y=-0.25))
    return fig


def _tower_runs(rows) -> dict[str | None, list]:
    """Rows (in depth order) cut into runs of consecutive sites on one tower, keyed by the tower: None
    for the layout's own (its vision grid runs on into the adapter and LLM), a second tower's grid
    prefix for that tower's sites. A grid whose sites all come before the layout's own vision sites is
    an earlier, finer stage feeding that grid (FastVLM's `vision.stages.{s}`: the sweep orders a second
    tower after the own grid), so it stays on the one line. Tables saved before the `grid` column were
    one-tower sweeps."""
    grids = list(rows.grid) if "grid" in rows.columns else [None] * len(rows)
    depths = list(rows.depth)
    own = [d for d, grid in zip(depths, grids) if grid == "vision"]
    first_own = min(own, default=None)
    earlier = {grid for grid in grids
               if first_own is not None and all(d < first_own for d, g in zip(depths, grids) if g == grid)}
    towers = [None if grid in (None, "vision", "llm") or grid in earlier else grid for grid in grids]
    runs: dict[str | None, list] = {}
    start = 0
    for end in range(1, len(rows) + 1):
        if end == len(rows) or towers[end] != towers[start]:
            runs.setdefault(towers[start], []).append(rows.iloc[start:end])
            start = end
    return runs


def _across(runs: list, column: str) -> list:
    """A column over a tower's runs, None between runs so that plotly breaks the line there."""
    if len(runs) == 1:
        return runs[0][column]
    return [value for k, run in enumerate(runs) for value in ([None] if k else []) + list(run[column])]


def _named(name: str, tower: str | None) -> str:
    return name if tower is None else f"{name} ({tower.removeprefix('vision.')})"


def _tower_style(tower: str | None, runs: list, markers: bool = True) -> dict:
    """A second tower's line: the condition's colour and dash, a different marker; a broken line
    stays broken (no line across the other tower's sites)."""
    style: dict = {"connectgaps": False} if len(runs) > 1 else {}
    if tower is not None and markers:
        style["marker"] = dict(symbol="diamond")
    return style


def plot_probe_predictions(sweep, example: int = 0, hooks: Sequence[str] | None = None, condition: str = "model") -> go.Figure:
    """The held-out image `example` (index into the test set), its ground truth and the probes'
    predicted segmentation at the chosen sites (default: input and output of the adapter and
    the last LLM layer)."""
    if not 0 <= example < len(sweep.test_indices):
        raise IndexError(f"example must be in 0..{len(sweep.test_indices) - 1} (held-out images), got {example}")
    if hooks is None:
        llm = [s.hook for s in sweep.sites if s.stage == "llm"]
        hooks = [h for h in ("adapter.hook_in", "adapter.hook_out") if any(s.hook == h for s in sweep.sites)] + llm[-1:]
    sites = {s.hook: s for s in sweep.sites}
    missing = [h for h in hooks if h not in sites]
    if missing:
        raise ValueError(f"{missing} were not probed in this sweep; probed: {list(sites)}")
    truth = sweep.test_masks[example].astype(float)
    truth[truth == sweep.ignore_index] = np.nan
    image = np.asarray(sweep.dataset[int(sweep.test_indices[example])]["image"].convert("RGB").resize(truth.shape[::-1]))
    titles = ["image", "ground truth", *(sites[h].label for h in hooks)]
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles, horizontal_spacing=0.02)
    fig.add_trace(go.Image(z=image), row=1, col=1)
    shown: set[int] = set()

    def heatmap(values, col):
        fig.add_trace(mask_heatmap(values, sweep.class_names), row=1, col=col)
        orient_like_image(fig, 1, col, f"x{col}")
        shown.update(int(c) for c in np.unique(values[~np.isnan(values)]))

    heatmap(truth, 2)
    for col, hook in enumerate(hooks, start=3):
        tokens = sweep.predictions[(condition, hook)][example : example + 1].long()
        painter = sweep.grids[sites[hook].grid].images(slice(example, example + 1))
        pixels = painter.paint(tokens)[0].numpy().astype(float)
        pixels[pixels < 0] = np.nan  # no token covers it
        heatmap(pixels, col)
    # The legend names the colours: one square marker per class that appears in any panel
    add_class_legend(fig, shown, sweep.class_names)
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    fig.update_yaxes(showticklabels=False, row=1, col=1)
    row = int(sweep.test_indices[example])
    fig.update_layout(title=f"Probe predictions, held-out image {example} (dataset row {row}, {condition})",
                      template="plotly_white", height=360, width=220 * len(titles),
                      legend=dict(orientation="h", y=-0.05, title="class"))
    return fig

