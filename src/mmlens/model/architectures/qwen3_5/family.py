"""Qwen3.5 (Qwen3_5ForConditionalGeneration): Qwen3-VL's tower and merger without deepstack, and a
hybrid LLM whose `layer_types` interleave linear attention with gated full attention.

The tower is Qwen3-VL's (packed native resolution, learned position grid, 2x2 merger; hooked as in
Qwen2-VL), and positions are Qwen3-VL's interleaved M-RoPE (from `get_rope_index`). A
"linear_attention" layer mixes tokens with a gated delta rule (`runtime/linear_attention.py`): its
points are `blocks.{l}.linear_attn.hook_*` and it has no `attn` (no pattern, no heads), so
knockouts, head sweeps and bidirectional edits that name it are refused (see
`interventions.selection.attention_layers`). A "full_attention" layer is Qwen3's attention (q/k
RMSNorms, partial rotary) whose q_proj also emits a gate: the heads' output is multiplied by its
sigmoid before o_proj; `attn.hook_q_gate` holds the gate and `attn.hook_z` the gated output (TL's
bridge's convention). Every RMSNorm scales by `1 + weight`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor, nn

from ....errors import HookNameError, UnsupportedModelError
from ...config import LINEAR_ATTENTION, MLLMConfig, StageConfig
from ...hook_names import LINEAR_ATTENTION_PREFIX, parse_hook_name
from ...runtime.attention_masks import additive_mask
from ...runtime.instrument import AttentionSpec
from ...runtime.linear_attention import LinearAttentionSpec
from ..bridge_aliases import (
    LINEAR_ATTENTION_ALIASES, LLM_ALIASES, LLM_BRANCH_OUTPUT_ALIASES, LLM_QK_NORM_ALIASES, PROJECTOR_OUTPUT_ALIASES,
)
from ..llava import LLM_BLOCK, Llava
from ..qwen2_vl import QWEN_VISION_BLOCK_ALIASES, Qwen2VL
from ..qwen3_vl.family import QWEN3_VISION_MLP_ALIASES, Qwen3VL

FULL_ATTENTION = "full_attention"

QWEN3_5_BLOCK = replace(
    LLM_BLOCK,
    attention=AttentionSpec(q_norm="q_norm", k_norm="k_norm", output_gate=True),
    linear_attention=LinearAttentionSpec(),
)


class Qwen3_5(Qwen2VL):
    hf_class_names = ("Qwen3_5ForConditionalGeneration",)
    # TransformerBridge's names (TL 4.3 wraps Qwen3.5): Qwen3-VL's tower, the LLM's, and the linear
    # attention's own; its mixer output is our `hook_attn_out`. A block's mixer names (`attn.*`,
    # `linear_attn.*`) resolve only in the blocks of that kind (`canonical_name`).
    bridge_aliases = (*QWEN_VISION_BLOCK_ALIASES, *QWEN3_VISION_MLP_ALIASES, *PROJECTOR_OUTPUT_ALIASES,
                      *LLM_QK_NORM_ALIASES, *LINEAR_ATTENTION_ALIASES, *LLM_ALIASES, *LLM_BRANCH_OUTPUT_ALIASES)
    llm_block = QWEN3_5_BLOCK
    vision_width = staticmethod(Qwen3VL.vision_width)

    @staticmethod
    def llm_config(tc: Any) -> StageConfig:
        unknown = sorted(set(tc.layer_types) - {FULL_ATTENTION, LINEAR_ATTENTION})
        if unknown:
            raise UnsupportedModelError(
                f"Qwen3.5 layer_types {unknown} are not supported: mmlens hooks {FULL_ATTENTION!r} and "
                f"{LINEAR_ATTENTION!r} layers only; fix the config's text_config.layer_types"
            )
        return replace(Llava.llm_config(tc), use_qk_norm=True, layer_types=tuple(tc.layer_types))

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        cfg = super().build_config(hf_model)
        self.linear_layers = frozenset(cfg.llm.linear_attention_layers)
        self.check_output_gate(hf_model, cfg)
        return cfg

    def check_output_gate(self, hf_model: nn.Module, cfg: MLLMConfig) -> None:
        """Refuse a block spec that reads the query rows of q_proj otherwise than the model emits
        them: with an output gate each head's queries are followed by its gate (2 x d_head rows), and
        a spec without the gate would read twice the heads (or, the other way, half)."""
        spec, heads, d_head = self.llm_block.attention, cfg.llm.n_heads, cfg.llm.d_head
        for layer in sorted(set(range(cfg.llm.n_layers)) - self.linear_layers):
            attn = self.llm_attention(hf_model, layer)
            rows = getattr(attn, spec.q).out_features
            gated = rows == 2 * heads * d_head
            if gated != spec.output_gate:
                emits = "each head's queries and its output gate" if gated else "queries only, no output gate"
                raise UnsupportedModelError(
                    f"{cfg.architecture}: blocks.{layer} ({type(self.llm_layers(hf_model)[layer]).__name__}) does not "
                    f"match its block spec: its attention's {spec.q} emits {rows} rows ({emits}; {heads} heads of "
                    f"{d_head}), but the spec's AttentionSpec has output_gate={spec.output_gate}. Set "
                    f"output_gate={gated} in the family's block spec")

    # ------------------------------------------------------------- attention
    def hf_attention_mask(self, edges: Bool[Tensor, "batch seq seq"], dtype: torch.dtype = torch.float32) -> Any:
        """One mask per layer type, as Qwen3.5's forward takes them: the 4D mask for the attention
        layers, and for the linear ones the 2-D padding mask they zero padded tokens with (a query's
        edge to itself is open exactly where it is not padding)."""
        return {FULL_ATTENTION: additive_mask(edges, dtype),
                LINEAR_ATTENTION: edges.diagonal(dim1=1, dim2=2).long()}

    def llm_attention(self, hf_model: nn.Module, layer: int) -> nn.Module:
        if layer in self.linear_layers:
            raise UnsupportedModelError(f"LLM layer {layer} is a linear-attention layer (a gated delta rule): it has "
                                        f"no attention module; the full-attention layers are "
                                        f"{self.full_attention_layers()}")
        return super().llm_attention(hf_model, layer)

    def full_attention_layers(self) -> list[int]:
        layers = len(self._hf_model.config.text_config.layer_types)
        return [layer for layer in range(layers) if layer not in self.linear_layers]

    # ------------------------------------------------------------- names
    def canonical_name(self, name: str) -> str:
        """The bridge's names, where the block has the mixer the name is about: `attn.*` names
        resolve in full-attention blocks, `linear_attn.*` names in linear-attention ones."""
        renamed = super().canonical_name(name)
        if renamed == name:
            return name
        try:
            parsed = parse_hook_name(name)
        except HookNameError:  # outside the grammar, so not a block's name
            return renamed
        if parsed.in_llm_block:
            about_linear = parsed.site.startswith(LINEAR_ATTENTION_PREFIX)
            about_attention = parsed.site.startswith("attn.")
            linear = parsed.layer in self.linear_layers
            if (about_linear and not linear) or (about_attention and linear):
                return name
        return renamed
