"""LLaVA with a Qwen3 LLM: Qwen2's block with an RMSNorm over each head's queries and keys before
the rotary embedding (and no q/k/v biases), which the block spec names so the hooked attention
computes it; tower, projector and layout are LLaVA's."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ...config import StageConfig
from ...runtime.instrument import AttentionSpec
from .family import LLM_BLOCK, Llava

QWEN3_LLM_BLOCK = replace(LLM_BLOCK, attention=AttentionSpec(q_norm="q_norm", k_norm="k_norm"))


class LlavaQwen3(Llava):
    # registered as LLaVA's: `Llava.for_checkpoint` picks this variant for a Qwen3 LLM
    hf_class_names = ()
    llms = ("qwen3",)
    llm_block = QWEN3_LLM_BLOCK

    @staticmethod
    def llm_config(tc: Any) -> StageConfig:
        return replace(Llava.llm_config(tc), use_qk_norm=True)
