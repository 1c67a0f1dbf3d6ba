"""LLaVA with a DINOv2 tower (the study's third encoder): CLS, layer scale, plain or SwiGLU MLP."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import UnsupportedModelError
from mmlens.model.architectures import towers
from mmlens.testing_families import tiny_llava_dinov2

import family_tier as tier
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures


VARIANTS = {
    "mlp": lambda attn: tiny_llava_dinov2(attn_implementation=attn),
    "swiglu": lambda attn: tiny_llava_dinov2(swiglu=True, attn_implementation=attn),
    "registers": lambda attn: tiny_llava_dinov2(registers=2, attn_implementation=attn),
}
family, eager, builder = tier.fixtures(VARIANTS, eager_variants=["mlp", "registers"])


def test_the_tower_reads_like_dinov2(eager):
    cfg, layout = eager.model.cfg, eager.inputs.layout
    registers = cfg.vision.n_registers
    assert cfg.vision.has_cls and not cfg.vision.has_ln_pre
    assert int(layout.patch_positions[0]) == 1 + registers and layout.vision_seq_len == 17 + registers  # CLS, registers, 4x4
    assert cfg.adapter.n_image_tokens == 16 + registers  # "default" drops only the CLS before the projector
    for span in layout.spans:  # the registers reach the LLM right before the grid, outside it
        assert span.cls_position is None
        assert span.prefix_positions.tolist() == list(range(int(span.positions[0]) - registers, int(span.positions[0])))


def test_a_spec_without_layer_scale_is_refused(monkeypatch):
    dinov2 = towers.TOWERS["dinov2"]
    without = replace(dinov2, block=lambda config: replace(dinov2.block(config), layer_scale=None))
    monkeypatch.setitem(towers.TOWERS, "dinov2", without)
    hf_model, processor = tiny_llava_dinov2()
    with pytest.raises(UnsupportedModelError, match=r"vision\.blocks\.0 \(Dinov2Layer\) does not match"):
        HookedMLLM.from_hf(hf_model, processor)


def test_every_analysis_runs(eager):
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)
    tier.every_analysis_runs(eager.model, scenes)
