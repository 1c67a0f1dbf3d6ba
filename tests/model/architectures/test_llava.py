"""LLaVA (CLIP or SigLIP tower, MLP projector) with each supported LLM: Llama, Mistral, Qwen2.

The studies themselves run on the trained LLaVA (tiny-shapes-llava) in the other test files;
here the family tier checks parity and the attention rules for every LLM the family takes.
"""

from __future__ import annotations

from mmlens.testing import tiny_llava
from mmlens.testing_families import tiny_llava_with

import family_tier as tier
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

BUILDERS = {
    "llama": lambda attn: tiny_llava(llm_kv_heads=2, attn_implementation=attn),
    "mistral": lambda attn: tiny_llava_with("mistral", attn_implementation=attn),
    "qwen2": lambda attn: tiny_llava_with("qwen2", attn_implementation=attn),
}


family, eager, builder = tier.fixtures(BUILDERS)
