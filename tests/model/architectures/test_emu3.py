"""Emu3 is refused by name at load, saying what it needs, on a real tiny model: its images reach
the LLM as discrete VQ codes, h x (w + 1) token ids per image with an end-of-row token after each
row of codes, which no layout kind or hooked vision stage of mmlens expresses yet."""

from __future__ import annotations

import pytest
import torch

from mmlens import HookedMLLM
from mmlens.errors import UnsupportedModelError
from mmlens.testing.families.emu3 import END_OF_ROW, tiny_emu3

from conftest import random_images


def test_emu3_is_refused_naming_what_it_needs():
    hf_model, processor = tiny_emu3()
    with pytest.raises(UnsupportedModelError, match="Emu3ForConditionalGeneration") as refusal:
        HookedMLLM.from_hf(hf_model, processor)
    assert "VQ codes" in str(refusal.value) and "code-grid layout" in str(refusal.value)


@torch.no_grad()
def test_the_code_grid_the_refusal_describes():
    """What a code-grid layout must express, read off Hugging Face: an image of h x w codes (8 px
    each) fills h x (w + 1) placeholders, and the last of every w + 1 is the end-of-row token."""
    hf_model, processor = tiny_emu3()
    batch = processor(images=random_images(3), text=["<image> what"] * 3, padding=True, return_tensors="pt")
    codes = hf_model.model.get_image_tokens(batch["pixel_values"], batch["image_sizes"])
    end_of_row = processor.tokenizer.convert_tokens_to_ids(END_OF_ROW)
    start = 0
    for height, width in (batch["image_sizes"] // 8).tolist():
        image = codes[start : start + height * (width + 1)].view(height, width + 1)
        start += height * (width + 1)
        assert (image[:, -1] == end_of_row).all() and (image[:, :-1] != end_of_row).all()
    assert start == len(codes) == int((batch["input_ids"] == hf_model.config.image_token_id).sum())
