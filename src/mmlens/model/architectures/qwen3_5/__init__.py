"""Qwen3.5: Qwen3-VL's tower without deepstack, a hybrid LLM of gated-delta-rule (linear attention)
and gated full-attention layers."""

from .family import QWEN3_5_BLOCK, Qwen3_5

__all__ = ["QWEN3_5_BLOCK", "Qwen3_5"]
