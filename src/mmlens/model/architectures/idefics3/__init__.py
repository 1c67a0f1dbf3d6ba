"""Idefics3 and SmolVLM: square tiles plus a global image, a pixel shuffle, text separators; masks
follow the processor"s two resizes (`geometry.py`)."""

from .family import Idefics3
from .geometry import SplitGeometry

__all__ = ["Idefics3", "SplitGeometry"]
