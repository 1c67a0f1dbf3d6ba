"""FastVLM: FastViTHD (a timm tower of convolutional RepMixer stages, then attention stages, then a
final convolution) -> a 2-layer MLP projector -> a Qwen2 LLM, on LLaVA's fixed grid of 64 px cells."""

from .family import FastVlm
from .timm_backend import TIMM_NEEDED, timm_problem

__all__ = ["TIMM_NEEDED", "FastVlm", "timm_problem"]
