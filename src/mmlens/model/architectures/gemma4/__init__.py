"""Gemma 4: its own vision encoder (variable resolution, 2-D rotary, sandwich norms), soft tokens
pooled k x k by patch position, a Gemma 4 LLM (`family.py`); the image geometry (`geometry.py`),
the layout (`layout.py`), the tower's hooks (`tower.py`), an images-only processor (`processor.py`), and
the LLM block's per-layer inputs, KV sharing (`block.py`, `per_layer.py`) and experts (`experts.py`)."""

from .family import GEMMA4_BLOCK, Gemma4
from .geometry import Gemma4Geometry
from .processor import Gemma4ImageProcessor

__all__ = ["GEMMA4_BLOCK", "Gemma4", "Gemma4Geometry", "Gemma4ImageProcessor"]
