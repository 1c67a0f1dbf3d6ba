"""FastVLM's tower is a timm model, and timm imports torchvision whenever it is imported: both must be
installed for Hugging Face to build the model. This module tells which is missing without importing
either (an import of timm would fail half way on a torch without its torchvision)."""

from __future__ import annotations

from importlib.util import find_spec

TIMM_NEEDED = (
    "FastVLM's vision tower (FastViTHD) is a timm model, and timm imports torchvision: install both, matching "
    "your torch (`pip install timm torchvision`, torchvision at the release built for your torch version), then "
    "load the model again"
)


def timm_problem() -> str | None:
    """What keeps timm from importing here (`None`: timm and torchvision are both installed)."""
    missing = [name for name in ("timm", "torchvision") if find_spec(name) is None]
    return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed" if missing else None
