"""Aya Vision and Cohere2-Vision: SigLIP on tiles plus a thumbnail, a pixel shuffle + SwiGLU projector
(Aya's with a LayerNorm between), and a Cohere2 LLM of parallel blocks with rotary only on its
sliding-window layers (`cohere2.py`); each tile's run of image tokens marked by tokens of its own
(`layout.py`); Cohere2-Vision's own canvas rule and a processor for it without torchvision
(`cohere2_tiling.py`)."""

from .cohere2 import COHERE2_BLOCK
from .cohere2_tiling import Cohere2VisionImageProcessorPil
from .cohere2_vision import Cohere2Vision
from .family import AyaVision

__all__ = ["COHERE2_BLOCK", "AyaVision", "Cohere2Vision", "Cohere2VisionImageProcessorPil"]
