"""DeepSeek-VL: a SigLIP tower and a two-layer MLP aligner feeding a Llama LLM a fixed grid of
image tokens, with Janus's resize-then-pad image geometry."""

from .family import DeepseekVL

__all__ = ["DeepseekVL"]
