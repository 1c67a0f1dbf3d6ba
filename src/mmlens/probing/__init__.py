"""Linear probes on image tokens across vision encoder, adapter and LLM, and the layer sweep."""

from .compare import compare_sweeps, comparison_findings
from .controls import random_llm, randomly_initialised
from .linear import LinearProbe
from .logistic import fit_logistic
from .metrics import SegmentationScores, miou_from_counts, tokens_to_pixels
from .ridge import RidgeStatistics
from .saving import load_probe, load_sweep, save_probe, save_sweep
from .sites import Site, default_sites
from .store import ActivationStore
from .penalty import PenaltyChoice
from .seeds import combine_seeds, combined_findings
from .sweep import ProbeSweep, SweepSettings, probe_sweep
from .token_labels import TokenLabels, token_labels

__all__ = [
    "ActivationStore",
    "LinearProbe",
    "PenaltyChoice",
    "ProbeSweep",
    "RidgeStatistics",
    "SegmentationScores",
    "Site",
    "SweepSettings",
    "TokenLabels",
    "combine_seeds",
    "combined_findings",
    "compare_sweeps",
    "comparison_findings",
    "default_sites",
    "fit_logistic",
    "load_probe",
    "load_sweep",
    "miou_from_counts",
    "probe_sweep",
    "random_llm",
    "randomly_initialised",
    "save_probe",
    "save_sweep",
    "token_labels",
    "tokens_to_pixels",
]
