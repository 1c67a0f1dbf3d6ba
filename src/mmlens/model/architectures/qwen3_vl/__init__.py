"""Qwen3-VL: Qwen2-VL"s tower with a learned position grid, deepstack terms into the first LLM layers
(`deepstack.py`), a Qwen3 LLM."""

from .family import QWEN3_BLOCK, Qwen3VL

__all__ = ["QWEN3_BLOCK", "Qwen3VL"]
