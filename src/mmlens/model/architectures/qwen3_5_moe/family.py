"""Qwen3.5-MoE (Qwen3_5MoeForConditionalGeneration): Qwen3.5 whose every LLM MLP is a sparse
mixture of experts with a shared expert.

Everything but the MLPs is Qwen3.5's (the packed tower without deepstack, interleaved M-RoPE, the
hybrid of gated-delta-rule and gated full-attention layers). Each layer's `Qwen3_5MoeSparseMoeBlock`
routes like Qwen3-MoE (softmax over the router logits, the best `num_experts_per_tok`
renormalised, fused experts) and adds a gated MLP run on every token, scaled by the sigmoid of
`shared_expert_gate`; `runtime/moe.py` hooks the router, each expert and the shared expert
(`blocks.{l}.mlp.shared_expert.hook_*`: `hook_out` before its gate, as TL reads it, then
`hook_gate_logit`, `hook_gate` and `hook_gated_out`, what the block adds). `d_mlp` is one expert's width, as in
TransformerLens's MoE configs.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from ...config import MoEConfig, StageConfig
from ...runtime.moe import MoESpec
from ..bridge_aliases import MOE_ALIASES, SHARED_EXPERT_ALIASES, SHARED_EXPERT_GATE_ALIASES
from ..qwen3_5 import QWEN3_5_BLOCK, Qwen3_5

QWEN3_5_MOE_BLOCK = replace(
    QWEN3_5_BLOCK, moe=MoESpec(shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"))
# every MLP routes: the bridge's names for a dense MLP's points (`mlp.gate` is the router here) name nothing
_DENSE_MLP_POINTS = {f"blocks.{{layer}}.mlp.{point}" for point in ("hook_pre", "hook_pre_linear", "hook_post")}


class Qwen3_5Moe(Qwen3_5):
    hf_class_names = ("Qwen3_5MoeForConditionalGeneration",)
    bridge_aliases = tuple(a for a in (*MOE_ALIASES, *SHARED_EXPERT_ALIASES, *SHARED_EXPERT_GATE_ALIASES,
                                                *Qwen3_5.bridge_aliases)
                           if a.ours.text not in _DENSE_MLP_POINTS)
    llm_block = QWEN3_5_MOE_BLOCK

    @staticmethod
    def llm_config(tc: Any) -> StageConfig:
        # the text config has no dense `intermediate_size`: Qwen3.5's reading, with an expert's width there
        sizes = SimpleNamespace(**{**tc.to_dict(), "intermediate_size": tc.moe_intermediate_size})
        moe = MoEConfig(layers=tuple(range(tc.num_hidden_layers)), n_experts=tc.num_experts,
                        top_k=tc.num_experts_per_tok, d_expert=tc.moe_intermediate_size, shared_expert=True)
        return replace(Qwen3_5.llm_config(sizes), moe=moe)
