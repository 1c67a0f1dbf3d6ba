"""Shared fixtures: tiny LLaVA models built from HF configs (random weights, fixed seeds).

Each fixture returns the hooked model, an untouched deep copy of the Hugging Face model to
compare against, and a padded batch with several prompts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from mmlens import HookedMLLM, MultimodalInputs
from mmlens.testing import tiny_llava

VARIANTS = {
    "clip": dict(vision="clip"),
    "siglip": dict(vision="siglip", vision_feature_layer=-1),
    "clip_gqa": dict(vision="clip", llm_heads=4, llm_kv_heads=2, vision_feature_select_strategy="full"),
}


@dataclass
class Tiny:
    model: HookedMLLM
    reference: LlavaForConditionalGeneration
    inputs: MultimodalInputs


def random_images(n: int, seed: int = 0, sizes=((40, 50), (32, 32), (61, 37))) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8))
        for i in range(n)
    ]


def build_tiny(variant: str, padding_side: str = "left", seed: int = 0) -> Tiny:
    hf_model, processor = tiny_llava(**VARIANTS[variant], seed=seed)
    processor.tokenizer.padding_side = padding_side
    reference = copy.deepcopy(hf_model)
    model = HookedMLLM.from_hf(hf_model, processor)
    inputs = model.prepare(
        random_images(3, seed),
        ["what is in the image ?", "how many", "the colour of the left shape is ?"],
    )
    return Tiny(model, reference, inputs)


@pytest.fixture(scope="session", params=list(VARIANTS))
def tiny(request) -> Tiny:
    return build_tiny(request.param)


@pytest.fixture(scope="session")
def tiny_clip() -> Tiny:
    return build_tiny("clip")


@pytest.fixture(autouse=True)
def _no_leftover_hooks(request):
    yield
    for name in ("tiny", "tiny_clip"):
        if name in request.fixturenames:
            request.getfixturevalue(name).model.reset_hooks(including_permanent=True)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _grad_mode_restored():
    """A test (or the in-process CLI, which turns gradients off for good) must not leave autograd
    off for the tests after it: training tests then fail far from the cause."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)
