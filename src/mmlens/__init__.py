"""mmlens: TransformerLens for multimodal LLMs (vision encoder -> adapter -> LLM)."""

from .model import (
    HookedMLLM,
    HookNameError,
    ImageTokenLayout,
    MLLMConfig,
    MultimodalActivationCache,
    MultimodalInputs,
)

__version__ = "0.1.0"
__all__ = [
    "HookNameError",
    "HookedMLLM",
    "ImageTokenLayout",
    "MLLMConfig",
    "MultimodalActivationCache",
    "MultimodalInputs",
    "__version__",
]
