"""LightOnOCR: Mistral 3's geometry (Pixtral tower, RMSNorm + 2x2 merger + MLP) under its own module
names, a Qwen3 LLM, and image tokens in one contiguous run per image."""

from .family import LightOnOcr

__all__ = ["LightOnOcr"]
