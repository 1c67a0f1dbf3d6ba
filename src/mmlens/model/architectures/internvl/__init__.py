"""InternVL: InternViT on aspect-ratio tiles plus a thumbnail, pixel shuffle, LN + MLP; the tiling
replayed from each image"s size (`geometry.py`); an image-only processor."""

from .family import InternVL
from .geometry import TileGeometry, Tiling
from .processor import ImageOnlyInternVLProcessor

__all__ = ["ImageOnlyInternVLProcessor", "InternVL", "TileGeometry", "Tiling"]
