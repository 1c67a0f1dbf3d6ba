"""Qwen2-VL and Qwen2.5-VL: a packed native-resolution tower (`tower.py`), a 2x2 merger, M-RoPE; masks
follow `smart_resize` (`geometry.py`); an image-only processor."""

from .family import QWEN_VISION_BLOCK_ALIASES, Qwen2_5_VL, Qwen2VL
from .geometry import SmartResizeGeometry
from .processor import QwenImageProcessor

__all__ = ["QWEN_VISION_BLOCK_ALIASES", "Qwen2VL", "Qwen2_5_VL", "QwenImageProcessor", "SmartResizeGeometry"]
