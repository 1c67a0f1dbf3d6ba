"""mmlens: TransformerLens for multimodal LLMs (vision encoder -> adapter -> LLM).

Public names are imported on first use (`mmlens.HookedMLLM` loads torch then, `import mmlens`
does not), so the `mmlens` command answers `--help` and config errors without loading a model
stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import errors
from .errors import HookNameError, MMLensError
from .lazy import after_import as _after_import, lazy_exports as _lazy_exports

if TYPE_CHECKING:  # what static tools (type checkers, the API docs) resolve the lazy names to
    from .model import (HookedMLLM, ImageTokenLayout, MLLMConfig, MultimodalActivationCache,
                        MultimodalInputs)
    from .runs.loading import load_run
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
    "load_run",
    "load_sae",
    "__version__",
]

_SUBPACKAGES = ("data", "distributed", "experiments", "findings", "interventions", "model", "placement", "probing",
                "resampling", "runs", "sae", "viz", "zoo")
# a name listed here, or any submodule (`mmlens.checksums`), is imported on first access
__getattr__, __dir__ = _lazy_exports(__name__, {
    **{name: ".model" for name in ("HookedMLLM", "ImageTokenLayout", "MLLMConfig", "MultimodalActivationCache",
                                   "MultimodalInputs")},
    "SAE": ".sae",
    "load_sae": ".sae",
    "load_run": ".runs.loading",
    **{name: f".{name}" for name in _SUBPACKAGES},
})



def _register_shipped_models() -> None:
    from . import zoo  # noqa: F401  (registers the shipped models with the loader)


# The shipped models register with the loader whenever it is imported, from whichever module.
_after_import(f"{__name__}.model.loading", _register_shipped_models)
del TYPE_CHECKING, annotations  # keep dir(mmlens) to the package's own names
