from .family import LLAMA4_BLOCK, LLAMA4_MOE, Llama4
from .processor import Llama4ImageProcessorPil

__all__ = ["LLAMA4_BLOCK", "LLAMA4_MOE", "Llama4", "Llama4ImageProcessorPil"]
