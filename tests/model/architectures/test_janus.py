"""Janus: its understanding path (SigLIP-style tower -> MLP aligner -> Llama) on LLaVA's fixed
grid, with Janus's resize-then-pad geometry; the VQ model (generation only) is never run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import UnsupportedModelError
from mmlens.testing.families.janus import tiny_janus

import family_tier as tier
from conftest import random_images
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

family, eager, builder = tier.fixtures({"janus": lambda attn: tiny_janus(attn_implementation=attn)})


@torch.no_grad()
def test_the_aligner_reads_the_post_normed_tower_and_fills_the_placeholders(eager):
    """`adapter.hook_in` is the tower's last hidden state after its post-layernorm, every patch;
    `adapter.hook_hidden` is what the aligner's last layer reads; the boundary tokens are text."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    assert model.cfg.adapter.n_image_tokens == 16 and model.cfg.adapter.token_grid == (4, 4)
    _, cache = model.run_with_cache(inputs, names_filter=["adapter.hook_in", "adapter.hook_hidden", "adapter.hook_out"])
    tower = reference.model.vision_model(inputs.pixel_values)
    torch.testing.assert_close(cache["adapter.hook_in"], tower.last_hidden_state, atol=1e-5, rtol=0)
    aligner = reference.model.aligner
    torch.testing.assert_close(cache["adapter.hook_hidden"], aligner.activation_fn(aligner.fc1(tower.last_hidden_state)),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["adapter.hook_out"], aligner(tower.last_hidden_state), atol=1e-5, rtol=0)
    tokenizer = model.processor.tokenizer
    for span in inputs.layout.spans:
        ids = inputs.input_ids[span.row].cpu()
        assert int(ids[span.positions[0] - 1]) == tokenizer.boi_token_id
        assert int(ids[span.positions[-1] + 1]) == tokenizer.eoi_token_id


def test_mask_geometry_resizes_then_pads_like_the_processor(eager):
    """The mask geometry puts a wide image's pixels where the processor does: resized so the long
    side is 32, padded top and bottom with the mean colour, which a mask marks `ignore_index`."""
    geometry, processor = eager.model.geometry, eager.model.processor
    image = random_images(1)[0]  # 40 x 50 (height x width)
    assert geometry.output_size(40, 50) == (32, 32)
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(geometry.to_pixel_values(image)[0], pixels, atol=1e-6, rtol=0)
    labels = geometry.transform_mask(np.ones((40, 50), dtype=np.uint8))
    rows = np.flatnonzero((labels == 1).any(axis=1))
    assert (labels[: rows[0]] == 255).all() and (labels[rows[-1] + 1 :] == 255).all()
    assert (rows[0], 32 - rows[-1] - 1) == (3, 3)  # 26 image rows, centred


def test_options_outside_the_spec_are_refused_by_name():
    """LayerNorms on the tower's queries and keys are refused at load, naming the config field."""
    hf_model, processor = tiny_janus()
    hf_model.config.vision_config.use_qk_norm = True
    with pytest.raises(UnsupportedModelError, match="use_qk_norm"):
        HookedMLLM.from_hf(hf_model, processor)


def test_every_analysis_runs(eager):
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)
    tier.every_analysis_runs(eager.model, scenes)
