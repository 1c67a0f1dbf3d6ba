"""Plotly figures made for multimodal interpretability: layer curves, maps over the image grid,
attention painted on the image, and `save_figure`, which writes them to open offline with one
plotly.js per folder, or as PNG, SVG or PDF."""

from .attention_plots import plot_attention_on_image, plot_attention_pattern
from .files import StaticExportError, save_figure, write_plotly_js
from .intervention_plots import plot_attention_mask, plot_knockout_effect, plot_position_curve, plot_position_heatmap
from .masks import plot_image_and_mask
from .patching_plots import plot_head_heatmaps, plot_recovery_map
from .probe_plots import plot_probe_curve, plot_probe_predictions
from .style import class_colours

__all__ = [
    "StaticExportError",
    "class_colours",
    "plot_attention_mask",
    "plot_attention_on_image",
    "plot_attention_pattern",
    "plot_head_heatmaps",
    "plot_image_and_mask",
    "plot_knockout_effect",
    "plot_position_curve",
    "plot_position_heatmap",
    "plot_probe_curve",
    "plot_probe_predictions",
    "plot_recovery_map",
    "save_figure",
    "write_plotly_js",
]
