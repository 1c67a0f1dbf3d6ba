"""Gemma 3: a SigLIP tower, k x k pooling, a Gemma 3 LLM; images attend to themselves both ways."""

from .family import GEMMA3_BLOCK, Gemma3

__all__ = ["GEMMA3_BLOCK", "Gemma3"]
