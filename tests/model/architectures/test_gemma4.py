"""Gemma 4's images-only processor and tiny builder: each image becomes its own number of soft
tokens (aspect ratio kept, k x k pooling of its patches), and Hugging Face's model runs on what the
processor gives; the family itself is still refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

from mmlens import HookedMLLM
from mmlens.errors import UnsupportedModelError
from mmlens.testing.families.gemma4 import SMALLEST_SOFT_TOKEN_BUDGET, tiny_gemma4

from conftest import random_images

PROMPTS = ["<|image|> what is in the image ?", "<|image|> how many", "<|image|> the colour of the left shape is ?"]


@pytest.fixture(scope="module")
def gemma4_parts():
    return tiny_gemma4()


@torch.no_grad()
def test_each_image_gets_its_own_soft_tokens_and_hf_runs_on_them(gemma4_parts):
    hf_model, processor = gemma4_parts
    images = random_images(3)
    inputs = processor(images=[[image] for image in images], text=PROMPTS, return_tensors="pt", padding=True)
    vision = hf_model.config.vision_config
    side = vision.patch_size * vision.pooling_kernel_size
    expected = []
    for image in images:
        height, width = get_aspect_ratio_preserving_size(
            image.height, image.width, vision.patch_size, SMALLEST_SOFT_TOKEN_BUDGET * vision.pooling_kernel_size**2,
            vision.pooling_kernel_size,
        )
        expected.append((height // side) * (width // side))
    ids = inputs["input_ids"]
    placeholders = ids == hf_model.config.image_token_id
    assert placeholders.sum(dim=1).tolist() == expected and len(set(expected)) == 3, "three sizes, three token counts"
    assert inputs["attention_mask"].min() == 0, "the batch is padded"
    assert torch.equal(inputs["mm_token_type_ids"] == 1, placeholders)
    for row in range(len(images)):  # each image's tokens are one run between its start and end markers
        positions = placeholders[row].nonzero().flatten()
        assert torch.equal(positions, torch.arange(int(positions[0]), int(positions[-1]) + 1))
        assert int(ids[row, positions[0] - 1]) == hf_model.config.boi_token_id
        assert int(ids[row, positions[-1] + 1]) == hf_model.config.eoi_token_id
    features = hf_model.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"]).pooler_output
    assert [len(f) for f in features] == expected
    logits = hf_model(**inputs).logits
    assert torch.isfinite(logits).all()


def test_gemma4_is_refused_by_name(gemma4_parts):
    hf_model, processor = gemma4_parts
    with pytest.raises(UnsupportedModelError, match="Gemma4ForConditionalGeneration is not a supported architecture"):
        HookedMLLM.from_hf(hf_model, processor)
