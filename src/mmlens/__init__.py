"""mmlens: TransformerLens for multimodal LLMs (vision encoder -> adapter -> LLM)."""

from . import errors
from .errors import MMLensError
from . import zoo as _zoo  # noqa: F401 - registers the shipped models with the loader
from .model import (
    HookedMLLM,
    HookNameError,
    ImageTokenLayout,
    MLLMConfig,
    MultimodalActivationCache,
    MultimodalInputs,
)
from .sae import SAE, load_sae

__version__ = "0.1.0"
__all__ = [
    "MMLensError",
    "errors",
    "HookNameError",
    "HookedMLLM",
    "ImageTokenLayout",
    "MLLMConfig",
    "MultimodalActivationCache",
    "MultimodalInputs",
    "SAE",
    "load_sae",
    "__version__",
]
