"""Where a family keeps the Hugging Face modules mmlens reaches: one table per family.

Like the `component_mapping` of a TransformerLens 4.x adapter, a `ModulePaths` names each part
by its attribute path (`model.language_model`), the stages' parts from the Hugging Face model and
what lies inside a stage from that stage's module; `Architecture`'s accessors (`vision_tower`,
`vision_layers`, `projector`, `llm_layers`, ...) read it, so a family declares a path once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModulePaths:
    """Attribute paths (for `nn.Module.get_submodule`) of the modules the hook tree and the TL
    surface reach; the defaults are Hugging Face's names in every family so far."""

    vision_tower: str  # from the model: the vision stack's module, called on pixel values
    vision_layers: str  # from the vision tower: its blocks, in order (`vision.blocks.{i}`)
    projector: str  # from the model: the adapter between the tower and the LLM
    llm: str  # from the model: the decoder holding the token embedding, the blocks and the final norm
    llm_layers: str = "layers"  # from the LLM: its blocks, in order (`blocks.{l}`)
    embed: str = "embed_tokens"  # from the LLM: the token embedding (`W_E`)
    unembed: str = "lm_head"  # from the model: the unembedding (`W_U`, `model.unembed`)
    llm_attention: str = "self_attn"  # from an LLM block: its attention

