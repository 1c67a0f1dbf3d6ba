"""LLaVA: a CLIP, SigLIP or DINOv2 tower (`towers.py`), an MLP projector, a Llama, Mistral or Qwen2
LLM."""

from .family import LLM_BLOCK, LLMS, Llava

__all__ = ["LLM_BLOCK", "LLMS", "Llava"]
