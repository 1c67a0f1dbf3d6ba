"""DeepSeek-VL: SigLIP tower -> two-layer MLP aligner -> Llama on LLaVA's fixed grid, with
Janus's resize-then-pad geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import UnsupportedModelError
from mmlens.testing.families.deepseek_vl import tiny_deepseek_vl

import family_tier as tier
from conftest import random_images
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

family, eager, builder = tier.fixtures({"deepseek_vl": lambda attn: tiny_deepseek_vl(attn_implementation=attn)})


@torch.no_grad()
def test_the_aligner_reads_the_post_normed_tower_and_fills_the_placeholders(eager):
    """`adapter.hook_in` is the tower's last hidden state after its post-layernorm, every patch;
    `adapter.hook_hidden` is what `linear2` reads; the image token count is the patch grid."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    assert model.cfg.adapter.n_image_tokens == 16 and model.cfg.adapter.token_grid == (4, 4)
    aligner, tower = reference.model.aligner, reference.model.vision_model(inputs.pixel_values).last_hidden_state
    expected = {"adapter.hook_in": tower, "adapter.hook_hidden": aligner.activation(aligner.linear1(tower)),
                "adapter.hook_out": aligner(tower)}
    _, cache = model.run_with_cache(inputs, names_filter=list(expected))
    for name, activation in expected.items():
        torch.testing.assert_close(cache[name], activation, atol=1e-5, rtol=0, msg=name)
    image_token_id = reference.config.image_token_id
    for span in inputs.layout.spans:
        ids = inputs.input_ids[span.row].cpu()
        assert len(span.positions) == 16 and (ids[span.positions] == image_token_id).all()


def test_mask_geometry_resizes_then_pads_like_the_processor(eager):
    """A wide image is resized so its long side is 32 and padded top and bottom with the mean
    colour, where the processor puts it; a mask marks the padding `ignore_index`."""
    geometry, processor = eager.model.geometry, eager.model.processor
    image = random_images(1)[0]  # 40 x 50 (height x width)
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(geometry.to_pixel_values(image)[0], pixels, atol=1e-6, rtol=0)
    labels = geometry.transform_mask(np.ones((40, 50), dtype=np.uint8))
    rows = np.flatnonzero((labels == 1).any(axis=1))
    assert (rows[0], 32 - rows[-1] - 1) == (3, 3)  # 26 image rows, centred
    assert (labels[: rows[0]] == 255).all() and (labels[rows[-1] + 1 :] == 255).all()


def test_a_tower_outside_the_family_is_refused_by_name():
    """A DeepSeek-VL config with a CLIP tower is refused at load, naming the config field."""
    from transformers import CLIPVisionConfig, DeepseekVLConfig, DeepseekVLForConditionalGeneration

    hf_model, processor = tiny_deepseek_vl()
    config = DeepseekVLConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                             num_attention_heads=4, image_size=32, patch_size=8),
                              text_config=hf_model.config.text_config, image_token_id=hf_model.config.image_token_id)
    clip_model = DeepseekVLForConditionalGeneration(config).eval()
    with pytest.raises(UnsupportedModelError, match="vision_config.model_type = 'clip_vision_model'"):
        HookedMLLM.from_hf(clip_model, processor)


def test_every_analysis_runs(eager):
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)
    tier.every_analysis_runs(eager.model, scenes)
