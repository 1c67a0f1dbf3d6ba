"""The hooked model, its config, inputs and image-token layout."""

from .cache import MultimodalActivationCache
from .config import AdapterConfig, MLLMConfig, StageConfig, VisionConfig
from .hooked_mllm import HookedMLLM, HookNameError
from .inputs import MultimodalInputs
from .layout import ImageSpan, ImageTokenLayout, TokenGrid

__all__ = [
    "AdapterConfig",
    "HookNameError",
    "HookedMLLM",
    "ImageSpan",
    "ImageTokenLayout",
    "MLLMConfig",
    "MultimodalActivationCache",
    "MultimodalInputs",
    "StageConfig",
    "TokenGrid",
    "VisionConfig",
]
