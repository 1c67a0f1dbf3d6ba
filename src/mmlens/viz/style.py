"""Shared drawing pieces: colours with transparency, bootstrap-interval bands, metric names."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go


def rgba(hex_colour: str, alpha: float) -> str:
    hex_colour = hex_colour.lstrip("#")
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r}, {g}, {b}, {alpha})"


def interval_band(x: Sequence, low: Sequence[float], high: Sequence[float], colour: str, name: str = "95% interval") -> go.Scatter:
    """A filled band between `low` and `high` (lines only: plotly would add markers to short traces)."""
    x = list(x)
    return go.Scatter(x=x + x[::-1], y=list(high) + list(low)[::-1], mode="lines", fill="toself",
                      fillcolor=rgba(colour, 0.15), line=dict(width=0), hoverinfo="skip", showlegend=False, name=name)


def metric_label(name: str) -> str:
    """A metric column as a reader writes it: "miou" -> "mIoU", "pair_miou" -> "pair mIoU"."""
    return " ".join("mIoU" if word == "miou" else word for word in name.split("_"))
