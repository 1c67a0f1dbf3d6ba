"""Figures of attention: one head's attention painted over the image, and the whole pattern.

The painted map draws each image cell's attention over that cell's pixel box on the image's
canvas (edges from the layout, so tiles, merged patches and uneven grids land where the model saw
them), one panel per head, with the share of the query's attention that reached the image in each
panel's title. The pattern view is circuitsvis-like: every token on both axes, image tokens named
by image and cell, a head selector, and the hovered query's row marked across the matrix.
"""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import InputError


def plot_attention_on_image(attention, image: int = 0, *, segment: int | None = None, opacity: float = 0.6,
                            max_columns: int = 4) -> go.Figure:
    """One panel per head of an `ImageAttention` (`mmlens.experiments.attention_on_image`): the
    head's attention from the query on image `image`'s cells of one segment (its finest by default),
    over the picture the model saw; a vision-tower query patch is crossed."""
    segment = attention.finest_segment(image) if segment is None else segment
    cells = attention.grid_cells(image, segment)
    height, width = attention.canvases[image]
    picture = attention.images[image]
    grids = [attention.segment_grid(h, image, segment).numpy() for h in attention.heads]
    bound = max(float(g.max()) for g in grids) or 1.0
    mass = attention.mass[:, image].tolist()
    segments = attention.segments[image]
    several = len(segments) > 1
    titles = []
    for h, (head, total) in enumerate(zip(attention.heads, mass)):
        title = f"head {head}: {total:.3f} on the image"
        if several:
            title += f", {float(grids[h].sum()):.3f} in {segments[segment].kind}"
        titles.append(title)
    columns = min(max_columns, len(grids))
    rows = -(-len(grids) // columns)
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=titles, horizontal_spacing=0.04,
                        vertical_spacing=0.12 / rows)
    x_edges, y_edges = cells.x_edges.tolist(), cells.y_edges.tolist()
    query_cell = _query_cell(attention, image, segment)
    for k, (head, grid) in enumerate(zip(attention.heads, grids)):
        row, col = divmod(k, columns)
        row, col = row + 1, col + 1
        # the picture fills the canvas even when the model saw it squashed (a tiled image's base tile)
        fig.add_trace(go.Image(z=picture, dx=(dx := width / picture.shape[1]), dy=(dy := height / picture.shape[0]),
                                # plotly centres pixel 0 on x0: half a pixel in, so the edges meet the cells'
                                x0=dx / 2, y0=dy / 2, hoverinfo="skip"),
                      row=row, col=col)
        fig.add_trace(go.Heatmap(z=grid, x=x_edges, y=y_edges, zmin=0, zmax=bound, colorscale="Hot", opacity=opacity,
                                 showscale=k == 0, colorbar=dict(title="attention"), name=f"head {head}",
                                 customdata=np.stack(np.meshgrid(np.arange(grid.shape[1]), np.arange(grid.shape[0])), -1),
                                 hovertemplate="cell [%{customdata[1]},%{customdata[0]}]: %{z:.4f}<extra>head "
                                               f"{head}</extra>"), row=row, col=col)
        if query_cell is not None:
            (y, x), name = query_cell
            fig.add_trace(go.Scatter(x=[x], y=[y], mode="markers", name=name, showlegend=k == 0,
                                     marker=dict(symbol="x-thin-open", size=12, color="#39ff14", line=dict(width=3, color="#39ff14")),
                                     hovertemplate=name + "<extra></extra>"), row=row, col=col)
        fig.update_xaxes(showticklabels=False, range=[0, width], row=row, col=col)
        fig.update_yaxes(showticklabels=False, range=[height, 0], scaleanchor=f"x{k + 1}" if k else "x", row=row, col=col)
    where = {"vision": "vision tower", "llm": "LLM"}.get(attention.stage, attention.stage)  # or a second grid's prefix
    fig.update_layout(title=f"Attention on image {image}: {where} layer {attention.layer}<br><sup>from {attention.query}"
                            f"{'' if not several else f'; cells of its {segments[segment].kind} segment'}</sup>",
                      template="plotly_white", width=min(1200, 280 * columns + 160), height=280 * rows + 140,
                      legend=dict(orientation="h", y=-0.05))
    return fig


def _query_cell(attention, image: int, segment: int):
    """((y, x) pixel centre, label) of a vision query patch drawn on this image and segment, else None."""
    if attention.query_patch is None:
        return None
    q_image, q_segment, q_row, q_col = attention.query_patch
    if (q_image, q_segment) != (image, segment):
        return None
    cells = attention.grid_cells(image, segment)
    y = (float(cells.y_edges[q_row]) + float(cells.y_edges[q_row + 1])) / 2
    x = (float(cells.x_edges[q_col]) + float(cells.x_edges[q_col + 1])) / 2
    return (y, x), "query patch"


def plot_attention_pattern(pattern, *, size: int = 720) -> go.Figure:
    """An `AttentionPattern` (`mmlens.experiments.attention_pattern`) as an interactive matrix:
    queries down, keys across, every token labelled (image tokens `<img0 r3c5>`), one head shown
    at a time (the selector above), hovering a cell names query, key and weight and marks the
    query's row across the matrix."""
    if not pattern.heads:
        raise InputError("the pattern holds no head")
    # plotly reads its text as HTML: `<img0 r3c5>` would vanish as an unknown tag
    labels = [html.escape(label, quote=False) for label in pattern.labels]
    n = len(labels)
    hover = np.array([[f"{q} → {k}" for k in labels] for q in labels], dtype=object)
    fig = go.Figure()
    for k, head in enumerate(pattern.heads):
        fig.add_trace(go.Heatmap(z=pattern.pattern[k].numpy(), x=list(range(n)), y=list(range(n)), text=hover,
                                 colorscale="Blues", zmin=0, zmax=1, visible=k == 0, name=f"head {head}",
                                 colorbar=dict(title="attention"),
                                 hovertemplate="%{text}: %{z:.4f}<extra>head " + str(head) + "</extra>"))
    buttons = [dict(label=f"head {head}", method="update",
                    args=[{"visible": [i == k for i in range(len(pattern.heads))]},
                          {"title.text": _pattern_title(pattern, head)}])
               for k, head in enumerate(pattern.heads)]
    ticks = dict(tickmode="array", tickvals=list(range(n)), ticktext=labels, tickfont=dict(size=8),
                 showspikes=True, spikemode="across", spikethickness=1, spikecolor="#e4572e", spikesnap="cursor")
    fig.update_xaxes(title="key", tickangle=-90, **ticks)
    fig.update_yaxes(title="query", autorange="reversed", **ticks)
    fig.update_layout(title=_pattern_title(pattern, pattern.heads[0]), template="plotly_white", width=size + 200,
                      height=size + 160, hovermode="closest",
                      updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.08, yanchor="bottom",
                                        showactive=True)])
    return fig


def _pattern_title(pattern, head: int) -> str:
    return f"LLM layer {pattern.layer}, head {head}: attention pattern of batch row {pattern.row}"


__all__ = ["plot_attention_on_image", "plot_attention_pattern"]
