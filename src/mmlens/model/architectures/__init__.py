"""Registry of supported model families, keyed by Hugging Face class name."""

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

ARCHITECTURES: dict[str, type[Architecture]] = {
    name: arch for arch in (Llava, LlavaNext, LlavaOnevision, PaliGemma, Gemma3, Idefics3, Qwen2VL, Qwen2_5_VL,
                 Qwen3VL, InternVL, Mistral3)
    for name in arch.hf_class_names
}


def architecture_for(hf_model: nn.Module) -> Architecture:
    name = type(hf_model).__name__
    if name not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{name} is not a supported architecture; supported: {sorted(ARCHITECTURES)}. "
            "A new family is one small file in mmlens/model/architectures/."
        )
    return ARCHITECTURES[name]()


__all__ = ["ARCHITECTURES", "Architecture", "architecture_for"]
