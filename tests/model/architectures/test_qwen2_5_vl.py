"""Qwen2.5-VL: Qwen2-VL's layout with an RMSNorm/SwiGLU tower whose patches are reordered window by
window, window attention except in `fullatt_block_indexes`, and TransformerBridge's hook names."""

from __future__ import annotations

import pytest

from mmlens.testing_families import tiny_qwen2_vl

import family_tier as tier
from family_tier import assert_bridge_aliases
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures
from test_qwen2_vl import QWEN_TESTS

globals().update({test.__name__: test for test in QWEN_TESTS})  # Qwen2-VL's own checks, on this file's fixtures
family, eager, builder = tier.fixtures({"qwen2.5-vl": lambda attn: tiny_qwen2_vl("2.5", attn_implementation=attn)})


BRIDGE_NAMES = {
    "vision_encoder.blocks.1.hook_in": "vision.blocks.1.hook_resid_pre",
    "vision_encoder.blocks.1.hook_resid_post": "vision.blocks.1.hook_resid_post",
    "vision_encoder.blocks.0.norm2.hook_out": "vision.blocks.0.ln2.hook_normalized",
    "vision_encoder.blocks.0.attn.hook_in": "vision.blocks.0.ln1.hook_normalized",
    "vision_encoder.blocks.0.hook_attn_out": "vision.blocks.0.hook_attn_out",
    "vision_encoder.blocks.0.mlp.gate.hook_out": "vision.blocks.0.mlp.hook_pre",
    "vision_encoder.blocks.0.mlp.in.hook_out": "vision.blocks.0.mlp.hook_pre_linear",
    "vision_encoder.blocks.0.mlp.out.hook_in": "vision.blocks.0.mlp.hook_post",
    "embed.hook_out": "hook_embed",
    "blocks.1.hook_out": "blocks.1.hook_resid_post",
    "blocks.0.attn.hook_out": "blocks.0.hook_attn_out",
}


def test_bridge_hook_names_are_aliases(eager):
    model, inputs = eager.model, eager.inputs
    assert_bridge_aliases(model, inputs, BRIDGE_NAMES)
    with pytest.raises(Exception, match="unknown hook name"):  # its order differs from ours: not aliased
        model.resolve_hook_name("vision_projector.hook_out")
