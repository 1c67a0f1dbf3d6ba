"""DeepSeek-VL hybrid: DeepSeek-VL's SigLIP tower beside SAM's ViT on a high-resolution copy of each
image, the two towers' features concatenated by the aligner into one fixed grid of LLM tokens."""

from .family import DeepseekVLHybrid

__all__ = ["DeepseekVLHybrid"]
