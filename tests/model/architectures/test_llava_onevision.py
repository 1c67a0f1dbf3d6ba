"""LLaVA-OneVision: LLaVA-NeXT's tiles on a SigLIP tower; rows with several images are not tiled."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import InputError
from mmlens.testing_families import tiny_llava_onevision

import family_tier as tier
from conftest import random_images
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures


family, eager, builder = tier.fixtures({"llava_onevision": lambda attn: tiny_llava_onevision(attn_implementation=attn)})


def test_token_counts_are_the_processors(eager):
    model, inputs = eager.model, eager.inputs
    tile = model.cfg.vision.image_size
    for span, (height, width) in zip(inputs.layout.spans, inputs.extra["image_sizes"].tolist()):
        n = len(span.positions) + len(span.special["newline"])
        assert n == model.processor._get_number_of_features(height, width, tile, tile)  # SigLIP: no CLS to drop
        assert [s.kind for s in span.segments] == ["base", "tiles"] and span.canvas == (height, width)


@torch.no_grad()
def test_a_row_of_several_images_is_not_tiled():
    """Two images in one row: each is one square-padded tile, its grid then one newline; HF agrees
    bit for bit and the boxes still tile each image."""
    hf_model, processor = tiny_llava_onevision()
    reference = copy.deepcopy(hf_model)
    model = HookedMLLM.from_hf(hf_model, processor)
    images = random_images(3)
    inputs = model.prepare([[images[0], images[2]], [images[1]]], ["compare", "how many"])
    assert inputs.extra["batch_num_images"].tolist() == [2, 1]
    assert torch.equal(model(inputs), reference(**inputs.hf_kwargs()).logits)
    g = model.cfg.vision.image_size // model.cfg.vision.patch_size
    first, second = inputs.layout.images[0]
    for span in (first, second):
        assert [s.kind for s in span.segments] == ["base"] and len(span.special["newline"]) == 1
        assert span.special["newline"].item() == span.positions[-1].item() + 1 and len(span.positions) == g * g
        height, width = span.canvas
        cover = torch.zeros(height, width, dtype=torch.long)
        for y0, x0, y1, x1 in span.segments[0].tokens.boxes.tolist():
            cover[y0:y1, x0:x1] += 1
        assert (cover == 1).all()
    assert [s.kind for s in inputs.layout.images[1][0].segments] == ["base", "tiles"]
    _, cache = model.run_with_cache(inputs, names_filter=["adapter.hook_out", "hook_multimodal_embed"])
    layout, present = inputs.layout, inputs.layout.table("llm").present
    assert torch.equal(layout.gather("adapter", cache["adapter.hook_out"])[present],
                       layout.gather("llm", cache["hook_multimodal_embed"])[present])


def test_an_image_the_model_would_interpolate_is_refused():
    """Past anyres_max_N the model mixes features bilinearly: refused, never mislabelled."""
    hf_model, processor = tiny_llava_onevision()
    hf_model.config.vision_aspect_ratio = "anyres_max_1"
    model = HookedMLLM.from_hf(hf_model, processor, verify=False)
    image = Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))  # a 2x2 tile grid: 4 tiles' worth
    with pytest.raises(InputError, match="bilinear interpolation"):
        model.prepare([image], "")


def test_every_analysis_runs(eager):
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)
    tier.every_analysis_runs(eager.model, scenes)
