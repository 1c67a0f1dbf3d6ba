"""The registry of supported model families: the one place that lists them.

Each family lives in its own folder here (`<family>/family.py`: its `Architecture` subclass, beside
its tower, layout, geometry or processor as it needs) and is registered by its Hugging Face class
name(s) through one entry in `FAMILIES`. Code shared by several families is named for its technique
(`towers.py`, `anyres.py`, `pixel_shuffle.py`); nothing outside this package knows a family.
"""

from __future__ import annotations

from torch import nn

from ...errors import UnsupportedModelError
from .base import Architecture
from .gemma3 import Gemma3
from .idefics3 import Idefics3
from .internvl import InternVL
from .llava import Llava
from .llava_next import LlavaNext
from .llava_onevision import LlavaOnevision
from .mistral3 import Mistral3
from .paligemma import PaliGemma
from .qwen2_vl import Qwen2_5_VL, Qwen2VL
from .qwen3_vl import Qwen3VL

FAMILIES: tuple[type[Architecture], ...] = (
    Llava, LlavaNext, LlavaOnevision, PaliGemma, Gemma3, Idefics3, Qwen2VL, Qwen2_5_VL, Qwen3VL, InternVL, Mistral3,
)

ARCHITECTURES: dict[str, type[Architecture]] = {name: arch for arch in FAMILIES for name in arch.hf_class_names}


def family_folder(arch: type[Architecture]) -> str:
    """The folder of `architectures/` a registered family lives in (`"qwen2_vl"` for Qwen2.5-VL too)."""
    return arch.__module__.split(".")[-2]


def architecture_for(hf_model: nn.Module) -> Architecture:
    name = type(hf_model).__name__
    if name not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{name} is not a supported architecture; supported: {sorted(ARCHITECTURES)}. "
            "A new family is one folder in mmlens/model/architectures/ and one entry in its FAMILIES."
        )
    return ARCHITECTURES[name]()


__all__ = ["ARCHITECTURES", "FAMILIES", "Architecture", "architecture_for", "family_folder"]
