"""Qwen3.5-MoE: Qwen3.5 (hybrid linear / gated full attention) whose every LLM MLP is a sparse
mixture of experts beside a gated shared expert (`runtime/moe.py` hooks them)."""

from .family import QWEN3_5_MOE_BLOCK, Qwen3_5Moe

__all__ = ["QWEN3_5_MOE_BLOCK", "Qwen3_5Moe"]
