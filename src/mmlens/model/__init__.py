"""The hooked model, its config, inputs, hook-name grammar, image-token layout and pixel maps."""

from .cache import MultimodalActivationCache
from .config import AdapterConfig, MLLMConfig, StageConfig, VisionConfig
from .hook_names import HookName, block_hook, parse_hook_name
from .hooked_mllm import HookedMLLM, HookNameError
from .images.layout import ImageSpan, ImageTokenLayout
from .images.pixel_map import ImagePixelMaps, PixelMap, TokenGrid
from .inputs import MultimodalInputs

__all__ = [
    "AdapterConfig",
    "HookName",
    "HookNameError",
    "HookedMLLM",
    "ImagePixelMaps",
    "ImageSpan",
    "ImageTokenLayout",
    "MLLMConfig",
    "MultimodalActivationCache",
    "MultimodalInputs",
    "PixelMap",
    "StageConfig",
    "TokenGrid",
    "VisionConfig",
    "block_hook",
    "parse_hook_name",
]
