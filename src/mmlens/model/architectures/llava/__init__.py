"""LLaVA: a CLIP, SigLIP or DINOv2 tower (`towers.py`), an MLP projector, a Llama, Mistral or Qwen2
LLM; the variants for a Pixtral tower (`pixtral.py`, Pixtral-12B in LLaVA format) and a Qwen3 LLM
(`qwen3.py`)."""

from .family import LLM_BLOCK, LLMS, Llava

__all__ = ["LLM_BLOCK", "LLMS", "Llava"]
