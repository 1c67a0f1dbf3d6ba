"""Plotly figures made for multimodal interpretability: layer curves, maps over the image grid,
and `save_figure`, which writes them to open offline with one plotly.js per folder."""

from .files import save_figure, write_plotly_js
from .intervention_plots import plot_attention_mask, plot_knockout_effect, plot_position_curve, plot_position_heatmap
from .patching_plots import plot_head_heatmaps, plot_recovery_map
from .probe_plots import plot_probe_curve, plot_probe_predictions

__all__ = [
    "plot_attention_mask",
    "plot_head_heatmaps",
    "plot_knockout_effect",
    "plot_position_curve",
    "plot_position_heatmap",
    "plot_probe_curve",
    "plot_probe_predictions",
    "plot_recovery_map",
    "save_figure",
    "write_plotly_js",
]
