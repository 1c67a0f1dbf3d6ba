"""Shared drawing pieces: colours with transparency, bootstrap-interval bands, metric names, and the
one palette of class colours that every mask, prediction and legend uses."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative, sample_colorscale


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


# Colour words a class name may contain, drawn close to the synthetic scenes' own object colours
# so a mask reads like the image it labels.
NAMED_COLOURS = {
    "red": "#d72d2d", "blue": "#2d55d7", "green": "#28aa3c", "yellow": "#e1c828", "purple": "#8c3cc8",
    "orange": "#eb8219", "cyan": "#1ebec8", "magenta": "#d232aa", "pink": "#f06eaa", "brown": "#8c564b",
    "grey": "#7f7f7f", "gray": "#7f7f7f", "black": "#222222", "white": "#f2f2f2", "teal": "#17a589",
}
# Classes that are the absence of an object: a quiet grey, so the objects stand out.
BACKGROUND_NAMES = {"background", "void", "unlabeled", "unlabelled", "ignore", "other", "none"}
BACKGROUND_COLOUR = "#d9d9d9"
# Several classes of one colour (red_circle, red_square) get shades of it, in order of appearance.
_SHADES = (0.0, -0.35, 0.4, -0.6, 0.65)


def class_colours(class_names: Sequence[str]) -> list[str]:
    """One hex colour per class, used by every figure that colours classes (masks, predictions,
    legends): the colour a name says (`red_circle` is red; a second red class a darker red), a
    light grey for background-like names, and a fixed qualitative palette for the rest."""
    if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Sequence):
        raise TypeError(f"class_names must be a sequence of class names, got {type(class_names).__name__}")
    kinds = [_colour_word(name) or ("background" if _words(name) & BACKGROUND_NAMES else None) for name in class_names]
    fixed = [c for c in (*qualitative.Dark24, *qualitative.Light24) if c.lower() not in NAMED_COLOURS.values()]
    n_unnamed = kinds.count(None)
    if n_unnamed > len(fixed):  # more classes than distinct fixed colours (ADE20K's 150): spread them over Turbo
        fixed = [_hex(c) for c in sample_colorscale("Turbo", [k / max(n_unnamed - 1, 1) for k in range(n_unnamed)])]
    unnamed, same_colour = iter(fixed), {}
    colours = []
    for kind in kinds:
        if kind is None:
            colours.append(next(unnamed))
        elif kind == "background":
            colours.append(BACKGROUND_COLOUR)
        else:
            base = NAMED_COLOURS[kind]  # by colour, not word: grey_cat and gray_dog are two shades of one grey
            shade = _SHADES[same_colour.get(base, 0) % len(_SHADES)]
            same_colour[base] = same_colour.get(base, 0) + 1
            colours.append(_shaded(base, shade))
    return colours


def class_colorscale(colours: Sequence[str]) -> list[list]:
    """A stepped colour scale giving class index c exactly `colours[c]`, for a heatmap drawn with
    zmin=-0.5 and zmax=len(colours)-0.5."""
    n = len(colours)
    return [step for c, colour in enumerate(colours) for step in ([c / n, colour], [(c + 1) / n, colour])]


def _words(name: str) -> set[str]:
    return set(re.split(r"[^a-z]+", str(name).lower())) - {""}


def _colour_word(name: str) -> str | None:
    for word in re.split(r"[^a-z]+", str(name).lower()):
        if word in NAMED_COLOURS:
            return word
    return None


def _shaded(hex_colour: str, amount: float) -> str:
    """Towards black (amount < 0) or white (amount > 0) by |amount|."""
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=float)
    target = 255.0 if amount > 0 else 0.0
    mixed = np.rint(rgb + (target - rgb) * abs(amount)).astype(int)
    return "#" + "".join(f"{v:02x}" for v in mixed)


def _hex(colour: str) -> str:
    if colour.startswith("#"):
        return colour
    r, g, b = (int(float(v)) for v in re.findall(r"[\d.]+", colour)[:3])
    return f"#{r:02x}{g:02x}{b:02x}"
