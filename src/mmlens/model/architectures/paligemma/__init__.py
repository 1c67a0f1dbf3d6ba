"""PaliGemma: LLaVA with a linear projector, a Gemma LLM and prefix-LM attention."""

from .family import PaliGemma

__all__ = ["PaliGemma"]
