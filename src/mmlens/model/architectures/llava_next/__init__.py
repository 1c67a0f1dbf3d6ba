"""LLaVA-NeXT: LLaVA on anyres tiles (`architectures/anyres.py`), a base image and row newlines."""

from .family import LlavaNext

__all__ = ["LlavaNext"]
