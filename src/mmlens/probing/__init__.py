"""Linear probes on image tokens across vision encoder, adapter and LLM, and the layer sweep."""

from .linear import LinearProbe
from .logistic import fit_logistic
from .metrics import SegmentationScores, miou_from_counts, tokens_to_pixels
from .ridge import RidgeStatistics
from .sites import Site, default_sites
from .store import ActivationStore
from .sweep import ProbeSweep, SweepSettings, probe_sweep, randomly_initialised
from .token_labels import TokenLabels, token_labels

__all__ = [
    "ActivationStore",
    "LinearProbe",
    "ProbeSweep",
    "RidgeStatistics",
    "SegmentationScores",
    "Site",
    "SweepSettings",
    "TokenLabels",
    "default_sites",
    "fit_logistic",
    "miou_from_counts",
    "probe_sweep",
    "randomly_initialised",
    "token_labels",
    "tokens_to_pixels",
]
