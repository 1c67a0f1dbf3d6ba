"""Interventions on attention and activations: token groups, knockouts, explicit masks."""

from .bidirectional import BidirectionalImageAttention, bidirectional_image_attention
from ..model.attention_masks import allowed_edges, image_attention_mask, image_index_per_position
from .groups import GroupContext, TokenGroup
from .knockout import Knockout, knockout

__all__ = [
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
