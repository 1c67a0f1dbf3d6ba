"""The registry of supported model families: the one place that lists them.

Each family lives in its own folder here (`<family>/family.py`: its `Architecture` subclass, beside
its tower, layout, geometry or processor as it needs) and is registered by its Hugging Face class
name(s) through one entry in `FAMILIES`. Code shared by several families is named for its technique
(`towers.py`, `anyres.py`, `pixel_shuffle.py`, `type_ids.py`); nothing outside this package knows a family.
"""

from __future__ import annotations

from torch import nn

from ...errors import UnsupportedModelError
from .aya_vision import AyaVision, Cohere2Vision
from .base import Architecture
from .blip2 import Blip2, InstructBlip
from .deepseek_vl import DeepseekVL
from .deepseek_vl_hybrid import DeepseekVLHybrid
from .emu3 import Emu3
from .fast_vlm import FastVlm
from .gemma3 import Gemma3
from .gemma4 import Gemma4
from .glm4v import Glm4v, Glm4vMoe
from .idefics3 import Idefics3
from .internvl import InternVL
from .janus import Janus
from .lighton_ocr import LightOnOcr
from .llama4 import Llama4
from .llava import Llava
from .llava_next import LlavaNext
from .llava_onevision import LlavaOnevision
from .mllama import Mllama
from .mistral3 import Mistral3
from .paligemma import PaliGemma
from .qwen2_vl import Qwen2_5_VL, Qwen2VL
from .qwen3_5 import Qwen3_5
from .qwen3_5_moe import Qwen3_5Moe
from .qwen3_vl import Qwen3VL
from .qwen3_vl_moe import Qwen3VLMoe
from .vipllava import VipLlava

FAMILIES: tuple[type[Architecture], ...] = (
    Llava,
    LlavaNext,
    LlavaOnevision,
    PaliGemma,
    Gemma3,
    Gemma4,
    Idefics3,
    Qwen2VL,
    Qwen2_5_VL,
    Qwen3VL,
    Qwen3VLMoe,
    Qwen3_5,
    Qwen3_5Moe,
    InternVL,
    Mistral3,
    VipLlava,
    LightOnOcr,
    Glm4v,
    Glm4vMoe,
    Llama4,
    Janus,
    Emu3,
    DeepseekVL,
    DeepseekVLHybrid,
    Mllama,
    Blip2,
    InstructBlip,
    AyaVision,
    Cohere2Vision,
    FastVlm,
)

ARCHITECTURES: dict[str, type[Architecture]] = {name: arch for arch in FAMILIES for name in arch.hf_class_names}

# Classes researchers ask for that no family covers yet, with what each needs beyond what mmlens
# has, so the refusal says what is missing rather than only that the class is unknown.
NOT_YET_SUPPORTED: dict[str, str] = {
    "Gemma4UnifiedForConditionalGeneration": "it has no vision encoder (a patch embedder feeds the LLM directly), so "
    "there is no tower stage to hook; Gemma 4 itself is supported",
}


def family_folder(arch: type[Architecture]) -> str:
    """The folder of `architectures/` a registered family lives in (`"qwen2_vl"` for Qwen2.5-VL too)."""
    return arch.__module__.split(".")[-2]


def architecture_for(hf_model: nn.Module) -> Architecture:
    name = type(hf_model).__name__
    if name not in ARCHITECTURES:
        missing = f" ({NOT_YET_SUPPORTED[name]})" if name in NOT_YET_SUPPORTED else ""
        raise UnsupportedModelError(
            f"{name} is not a supported architecture{missing}; supported: {sorted(ARCHITECTURES)}. "
            "A new family is one folder in mmlens/model/architectures/ and one entry in its FAMILIES."
        )
    family = ARCHITECTURES[name]
    # one Hugging Face class, several geometries (LLaVA with a Pixtral tower): the family picks its variant
    return family.for_checkpoint(hf_model) if hasattr(family, "for_checkpoint") else family()


__all__ = ["ARCHITECTURES", "FAMILIES", "NOT_YET_SUPPORTED", "Architecture", "architecture_for", "family_folder"]
