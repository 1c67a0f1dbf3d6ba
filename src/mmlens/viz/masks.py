"""Class masks drawn beside their image: one colour per class, and the image's orientation.

A mask (a ground truth, or a probe's predictions painted over pixels) is a heatmap with a
stepped colour scale, so class index c is drawn in exactly `class_colours(names)[c]`: the colour
its name says where it says one. Its y axis is reversed like an image's, so row 0 is on top in
both panels and hovering reads the same row and column over the image and over the mask.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float, Int
from plotly.subplots import make_subplots

from ..errors import InputError
from .style import class_colorscale, class_colours


def mask_heatmap(mask: Float[np.ndarray, "height width"], class_names: Sequence[str]) -> go.Heatmap:
    """A heatmap of class indices (NaN where nothing is labelled, drawn transparent), in the
    class palette, with each pixel's class name on hover. Orient its axes with `orient_like_image`."""
    values = np.asarray(mask, dtype=float)
    names = np.array([*class_names, "ignore"], dtype=object)
    labelled = np.where(np.isnan(values), len(class_names), np.nan_to_num(values)).astype(int)
    return go.Heatmap(z=values, text=names[labelled], zmin=-0.5, zmax=len(class_names) - 0.5,
                      colorscale=class_colorscale(class_colours(class_names)), showscale=False,
                      hovertemplate="row %{y}, col %{x}: %{text}<extra></extra>")


def orient_like_image(fig: go.Figure, row: int, col: int, anchor: str) -> None:
    """Row 0 on top and square pixels in the panel at (row, col), as plotly draws an image;
    `anchor` is the panel's x axis name ("x", "x2", ...)."""
    fig.update_yaxes(autorange="reversed", scaleanchor=anchor, constrain="domain", showticklabels=False, showgrid=False,
                     zeroline=False, row=row, col=col)
    fig.update_xaxes(constrain="domain", showticklabels=False, showgrid=False, zeroline=False, row=row, col=col)


def add_class_legend(fig: go.Figure, classes: Iterable[int], class_names: Sequence[str], row: int = 1, col: int = 1) -> None:
    """One square legend marker per class index in `classes`, in the class palette."""
    colours = class_colours(class_names)
    for c in sorted(set(classes)):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=str(class_names[c]), showlegend=True,
                                 marker=dict(symbol="square", size=12, color=colours[c])), row=row, col=col)


def plot_image_and_mask(image: Int[np.ndarray, "height width 3"], mask: Int[np.ndarray, "height width"],
                        class_names: Sequence[str], title: str | None = None) -> go.Figure:
    """The image beside its segmentation mask (class index per pixel; any value outside the class
    range, such as an ignore index of 255, is left blank), one colour per class, both panels with
    row 0 on top."""
    image, mask = np.asarray(image), np.asarray(mask)
    if image.ndim != 3 or mask.ndim != 2 or image.shape[:2] != mask.shape:
        raise InputError(f"image must be [height, width, 3] and mask [height, width] of the same size; got image "
                         f"{image.shape} and mask {mask.shape}. Pass np.array(example['image']) and np.array(example['mask']).")
    values = mask.astype(float)
    values[(mask < 0) | (mask >= len(class_names))] = np.nan
    fig = make_subplots(rows=1, cols=2, subplot_titles=("image", "mask"), horizontal_spacing=0.04)
    fig.add_trace(go.Image(z=image), row=1, col=1)
    fig.add_trace(mask_heatmap(values, class_names), row=1, col=2)
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    fig.update_yaxes(showticklabels=False, row=1, col=1)
    orient_like_image(fig, 1, 2, "x2")
    add_class_legend(fig, (int(c) for c in np.unique(values[~np.isnan(values)])), class_names)
    fig.update_layout(title=title or "Image and its segmentation mask", template="plotly_white", height=380, width=700,
                      legend=dict(title="class"))
    return fig


__all__ = ["add_class_legend", "mask_heatmap", "orient_like_image", "plot_image_and_mask"]
