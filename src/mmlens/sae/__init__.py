"""Sparse autoencoders and transcoders on any hook point of a HookedMLLM: SAELens's module, file
format and splicing API (`model.run_with_saes`, `model.saes(...)`), and the formats researchers
download (SAELens, Gemma Scope, dictionary-learning), and the logit and tuned lenses drawn over the
image. docs/sae.md shows them."""

from .config import ARCHITECTURES, SAEConfig
from .formats import load_sae, sae_from_weights
from .sae import SAE
from .splice import add_sae, expected_width, reset_saes, run_with_cache_with_saes, run_with_hooks_with_saes, run_with_saes, spliced
from .alignment import best_feature_per_class, feature_class_iou
from .lens_maps import LensMaps, logit_lens_maps
from .maps import FeatureMaps, SegmentMap, canvas_picture, feature_activations, feature_maps
from .sparse_probing import SparseProbe, choose_features, fit_sparse_probe
from .steering import FeatureAttribution, FeatureEdit, feature_attribution, feature_edit_hooks, run_with_feature_edits
from .top_activations import TopActivation, top_activations
from .tracing import FeatureTrace, trace_vision_feature
from .activations import TokenActivations, image_token_activations
from .training import SAEEvaluation, SAETraining, TrainingSettings, evaluate_sae, train_sae, train_sae_on_activations
from .study import SAEStudy, sae_study
from .tuned_lens import TunedLens, train_tuned_lens

__all__ = [
    "ARCHITECTURES",
    "FeatureAttribution",
    "FeatureEdit",
    "FeatureMaps",
    "FeatureTrace",
    "LensMaps",
    "SAE",
    "SAEConfig",
    "SegmentMap",
    "SparseProbe",
    "TopActivation",
    "add_sae",
    "best_feature_per_class",
    "canvas_picture",
    "choose_features",
    "expected_width",
    "feature_activations",
    "feature_attribution",
    "feature_class_iou",
    "feature_edit_hooks",
    "feature_maps",
    "fit_sparse_probe",
    "load_sae",
    "logit_lens_maps",
    "reset_saes",
    "run_with_cache_with_saes",
    "run_with_feature_edits",
    "run_with_hooks_with_saes",
    "run_with_saes",
    "sae_from_weights",
    "spliced",
    "top_activations",
    "trace_vision_feature",
    "SAEEvaluation",
    "SAEStudy",
    "SAETraining",
    "TokenActivations",
    "TunedLens",
    "TrainingSettings",
    "evaluate_sae",
    "image_token_activations",
    "sae_study",
    "train_sae",
    "train_sae_on_activations",
    "train_tuned_lens",
]
