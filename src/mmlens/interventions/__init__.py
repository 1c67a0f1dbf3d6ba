"""Interventions on attention and activations: token groups, knockouts, explicit masks."""

from ..model.runtime.attention_masks import allowed_edges, image_attention_mask, image_index_per_position
from .attribution import Attribution, attribution_patching, rank_correlation
from .bidirectional import BidirectionalImageAttention, bidirectional_image_attention
from .cross_attention import CrossAttentionKnockout, cross_attention_knockout, encoder_cross_attention_knockout
from .corruptions import anchors_removed, counterfactual_images, mean_adapter_output, recovery_blocked
from .experts import ExpertAblation, ablate_experts, expert_conditions, expert_sweep
from .groups import GroupContext, TokenGroup
from .knockout import Knockout, knockout
from .patching import (Patch, Run, baseline, check_same_layout, head_sweep, layer_position_sweep, patch_conditions,
                       repeat_inputs)
from .patching_metrics import CacheMetric, ProbeMetric, logit_difference, probe_metric

__all__ = [
    "Attribution",
    "CacheMetric",
    "CrossAttentionKnockout",
    "cross_attention_knockout",
    "encoder_cross_attention_knockout",
    "ExpertAblation",
    "Patch",
    "ProbeMetric",
    "Run",
    "anchors_removed",
    "attribution_patching",
    "baseline",
    "check_same_layout",
    "ablate_experts",
    "counterfactual_images",
    "expert_conditions",
    "expert_sweep",
    "head_sweep",
    "layer_position_sweep",
    "logit_difference",
    "mean_adapter_output",
    "patch_conditions",
    "probe_metric",
    "rank_correlation",
    "recovery_blocked",
    "repeat_inputs",
    "BidirectionalImageAttention",
    "bidirectional_image_attention",
    "GroupContext",
    "Knockout",
    "TokenGroup",
    "allowed_edges",
    "image_attention_mask",
    "image_index_per_position",
    "knockout",
]
