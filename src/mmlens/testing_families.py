"""Tiny random-weight models of the families supported when `mmlens.testing.families` (one module
per family) was split out of this module, and the image-only processors it used to define; this
path stays for existing imports. A family added since has its builder only in
`mmlens.testing.families.<family>`."""

from .model.architectures.internvl import ImageOnlyInternVLProcessor
from .model.architectures.llava_onevision import ImageOnlyOnevisionProcessor
from .model.architectures.qwen2_vl import QwenImageProcessor
from .testing.families.gemma3 import gemma3_tokenizer, tiny_gemma3
from .testing.families.idefics3 import tiny_idefics3
from .testing.families.internvl import internvl_tokenizer, tiny_internvl
from .testing.families.llava import tiny_llava_dinov2, tiny_llava_with
from .testing.families.llava_next import tiny_llava_next
from .testing.families.llava_onevision import tiny_llava_onevision
from .testing.families.mistral3 import MISTRAL3_TOKENS, tiny_mistral3
from .testing.families.paligemma import tiny_paligemma
from .testing.families.qwen2_vl import QWEN_TEMPLATE, QWEN_TOKENS, tiny_qwen2_vl
from .testing.families.qwen3_vl import tiny_qwen3_vl

__all__ = [
    "ImageOnlyInternVLProcessor", "ImageOnlyOnevisionProcessor", "MISTRAL3_TOKENS", "QWEN_TEMPLATE", "QWEN_TOKENS",
    "QwenImageProcessor", "gemma3_tokenizer", "internvl_tokenizer", "tiny_gemma3", "tiny_idefics3", "tiny_internvl",
    "tiny_llava_dinov2", "tiny_llava_next", "tiny_llava_onevision", "tiny_llava_with", "tiny_mistral3",
    "tiny_paligemma", "tiny_qwen2_vl", "tiny_qwen3_vl",
]
