"""LLaVA-OneVision: LLaVA-NeXT"s tiles with a SigLIP tower; its image-only processor needs no
torchvision."""

from .family import LlavaOnevision
from .processor import ImageOnlyOnevisionProcessor

__all__ = ["ImageOnlyOnevisionProcessor", "LlavaOnevision"]
