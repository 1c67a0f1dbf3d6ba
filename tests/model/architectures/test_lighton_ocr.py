"""LightOnOCR: Mistral 3's packed Pixtral tower and 2x2 merger under other module names, a Qwen3 LLM,
and each image's tokens one contiguous run (no row breaks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

from mmlens.data import load_segmentation
from mmlens.errors import LayoutMismatchError
from mmlens.model.architectures.mistral3.layout import mistral3_layout
from mmlens.testing.families.lighton_ocr import tiny_lighton_ocr

import family_tier as tier
from conftest import random_images
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures
from test_llava_pixtral import assert_packed_tower_knockout_equals_hf

family, eager, builder = tier.fixtures({"lighton_ocr": lambda attn: tiny_lighton_ocr(attn_implementation=attn)})


def test_each_image_is_one_run_of_its_merged_grid(eager):
    """An image of h x w patches is (h / 2) x (w / 2) `[IMG]` tokens in one run, raster order, each
    fed by its 2x2 patches; no specials; the LLM has Qwen3's q/k norms."""
    model, inputs = eager.model, eager.inputs
    assert model.cfg.llm.use_qk_norm and "blocks.0.attn.q_ln.hook_normalized" in model.hook_names()
    assert len({tuple(span.segments[0].tokens.shape) for span in inputs.layout.spans}) == 3
    for span in inputs.layout.spans:
        (segment,) = span.segments
        rows, cols = segment.tokens.shape
        h, w = inputs.extra["image_sizes"][span.image_index].tolist()
        assert span.canvas == (h, w) and (rows, cols) == (h // 8, w // 8) and span.special == {}
        assert torch.equal(span.positions, torch.arange(int(span.positions[0]), int(span.positions[0]) + rows * cols))
        assert torch.equal(torch.bincount(segment.patch_to_token), torch.full((rows * cols,), 4))


def test_a_run_split_by_text_is_refused():
    image, text = 9, 1
    sizes = torch.tensor([[16, 24]])  # 2 x 3 tokens with 4-pixel patches and 2x2 merges
    kwargs = dict(image_token_id=image, patch_size=4, merge=2, row_breaks=False)
    layout = mistral3_layout(torch.tensor([[text] + [image] * 6 + [text]]), sizes, **kwargs)
    assert layout.spans[0].positions.tolist() == [1, 2, 3, 4, 5, 6] and layout.spans[0].special == {}
    with pytest.raises(LayoutMismatchError, match="not one contiguous run"):
        mistral3_layout(torch.tensor([[text] + [image] * 3 + [text] + [image] * 3 + [text]]), sizes, **kwargs)


@torch.no_grad()
def test_cache_equals_hf_hidden_states(eager):
    """The tier's, and the vision side's: residuals = the tower's, `adapter.hook_out` = HF's features."""
    tier.test_cache_equals_hf_hidden_states(eager)
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    _, cache = model.run_with_cache(inputs)
    sizes = inputs.extra["image_sizes"]
    tower = reference.model.vision_encoder(inputs.pixel_values, image_sizes=sizes, output_hidden_states=True)
    for block in range(model.cfg.vision.n_layers):
        torch.testing.assert_close(cache[f"vision.blocks.{block}.hook_resid_post"], tower.hidden_states[block + 1],
                                   atol=1e-5, rtol=0)
    features = torch.cat(reference.model.get_image_features(inputs.pixel_values, sizes).pooler_output)
    torch.testing.assert_close(cache["adapter.hook_out"][0], features, atol=1e-5, rtol=0)


@torch.no_grad()
def test_vision_knockout_equals_hf_with_its_mask(eager):
    assert_packed_tower_knockout_equals_hf(eager)


def test_the_processor_is_hugging_faces_with_pil_pixtral_images(eager):
    """Pixels are the PIL Pixtral processor's, padded to the batch; label masks follow the same resize."""
    model, inputs = eager.model, eager.inputs
    images = random_images(3)
    alone = PixtralImageProcessorPil(size=model.processor.image_processor.size, patch_size=8)(images, return_tensors="pt")
    assert torch.equal(alone["image_sizes"], inputs.extra["image_sizes"].cpu())
    torch.testing.assert_close(alone["pixel_values"], inputs.pixel_values.cpu(), atol=0, rtol=0)
    for span in inputs.layout.spans:
        image = images[span.image_index]
        assert model.transform_mask(np.zeros((image.height, image.width), dtype=np.uint8)).shape == span.canvas


def test_every_analysis_runs(eager):
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)
    tier.every_analysis_runs(eager.model, scenes)
