"""Qwen3-VL-MoE (Qwen3VLMoeForConditionalGeneration): Qwen3-VL whose LLM MLPs are sparse mixtures
of experts.

Everything but the LLM's MLPs is Qwen3-VL's (the packed tower, deepstack, M-RoPE, q/k norms). A
layer routes when it is not in `mlp_only_layers` and its number plus one is a multiple of
`decoder_sparse_step`; its `Qwen3VLMoeTextSparseMoeBlock` has a top-k router (`gate`: softmax over
the logits, the best `num_experts_per_tok` renormalised) and fused experts, hooked by
`runtime/moe.py` (`blocks.{l}.mlp.hook_router_logits`, `hook_expert_indices`,
`hook_expert_weights`, `mlp.experts.{e}.hook_*`); the other layers keep Qwen3's dense MLP and its
points.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ...config import MoEConfig, StageConfig
from ...runtime.moe import MoESpec
from ..bridge_aliases import LLM_ALIASES, MOE_ALIASES
from ..qwen3_vl import QWEN3_BLOCK, Qwen3VL

QWEN3_MOE_BLOCK = replace(QWEN3_BLOCK, moe=MoESpec())
# the plain LLM's MLP names: on this stack the bridge names dense and sparse MLPs apart (MOE_ALIASES)
_DENSE_MLP_ALIASES = tuple(a for a in LLM_ALIASES if a.ours.text.startswith("blocks.{layer}.mlp."))


def moe_layers(text_config: Any) -> tuple[int, ...]:
    """The layers Hugging Face builds a sparse MoE block for (Qwen3-MoE's rule)."""
    if not text_config.num_experts:
        return ()
    step, dense = text_config.decoder_sparse_step, set(text_config.mlp_only_layers or ())
    return tuple(layer for layer in range(text_config.num_hidden_layers)
                 if layer not in dense and (layer + 1) % step == 0)


class Qwen3VLMoe(Qwen3VL):
    hf_class_names = ("Qwen3VLMoeForConditionalGeneration",)
    bridge_aliases = (*MOE_ALIASES, *(a for a in Qwen3VL.bridge_aliases if a not in _DENSE_MLP_ALIASES))
    llm_block = QWEN3_MOE_BLOCK

    @staticmethod
    def llm_config(tc: Any) -> StageConfig:
        moe = MoEConfig(layers=moe_layers(tc), n_experts=tc.num_experts, top_k=tc.num_experts_per_tok,
                        d_expert=tc.moe_intermediate_size)
        return replace(Qwen3VL.llm_config(tc), moe=moe)
