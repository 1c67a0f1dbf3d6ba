"""The study's experiments, each composed from the public layers below (model, probing, interventions)."""

from .anchor_knockout import AnchorKnockoutResult, anchor_knockout
from .attention_on_image import AttentionPattern, ImageAttention, attention_on_image, attention_pattern
from .anchors import anchor_groups, conflicting_pairs, excluded_classes, pair_classes
from .position_study import PositionStudyResult, position_study
from .recovery_heads import RecoveryHeadsResult, RecoveryMap, find_recovery_heads

__all__ = [
    "AnchorKnockoutResult",
    "AttentionPattern",
    "ImageAttention",
    "PositionStudyResult",
    "RecoveryHeadsResult",
    "RecoveryMap",
    "anchor_groups",
    "anchor_knockout",
    "attention_on_image",
    "attention_pattern",
    "conflicting_pairs",
    "excluded_classes",
    "find_recovery_heads",
    "pair_classes",
    "position_study",
]
