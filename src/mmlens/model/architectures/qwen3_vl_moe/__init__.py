"""Qwen3-VL-MoE: Qwen3-VL with sparse mixture-of-experts MLPs in its LLM (`runtime/moe.py` hooks them)."""

from .family import QWEN3_MOE_BLOCK, Qwen3VLMoe, moe_layers

__all__ = ["QWEN3_MOE_BLOCK", "Qwen3VLMoe", "moe_layers"]
