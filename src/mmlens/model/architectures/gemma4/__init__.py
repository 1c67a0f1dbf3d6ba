"""Gemma 4: its own vision encoder (variable resolution, 2-D rotary, sandwich norms), soft tokens
pooled k x k by patch position, a Gemma 4 LLM. Only the images-only processor lives here so far;
the family itself is not registered yet (see docs/models.md, "Gemma 4")."""

from .processor import Gemma4ImageProcessor

__all__ = ["Gemma4ImageProcessor"]
