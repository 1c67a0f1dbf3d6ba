"""Plotly figures made for multimodal interpretability: layer curves, maps over the image grid."""

from .probe_plots import plot_probe_curve, plot_probe_predictions

__all__ = ["plot_probe_curve", "plot_probe_predictions"]
