"""Interventions on attention and activations: explicit masks, knockouts, patching."""

from .attention_masks import allowed_edges, image_attention_mask, image_index_per_position

__all__ = ["allowed_edges", "image_attention_mask", "image_index_per_position"]
