"""Mistral 3: a native-resolution Pixtral tower (`tower.py`), a 2x2 patch merger, rows split by break
tokens (`layout.py`); a processor without torchvision (`processor.py`)."""

from .family import Mistral3
from .geometry import PixtralGeometry
from .processor import Mistral3Processor

__all__ = ["Mistral3", "Mistral3Processor", "PixtralGeometry"]
