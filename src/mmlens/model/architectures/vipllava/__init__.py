"""VipLLaVA: LLaVA whose projector reads several CLIP layers at once, concatenated and LayerNorm'd."""

from .family import VipLlava

__all__ = ["VipLlava"]
