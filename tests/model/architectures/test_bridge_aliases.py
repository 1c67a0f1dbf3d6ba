"""TransformerBridge alias tables: composed of named parts, matched entry by entry in order (each
family's tables are checked against its own model by the family tier)."""

from __future__ import annotations

import pytest

from mmlens.errors import HookNameError
from mmlens.model.architectures import Llava, Qwen2VL
from mmlens.model.architectures.bridge_aliases import CLIP_TOWER_ALIASES, alias


def test_the_first_alias_that_has_a_name_gives_ours():
    """LLaVA's tower names its attention output `attn.hook_out`: that is our `hook_attn_out`, not the
    `attn.hook_{point}` entry after it, which carries every other attention point over."""
    llava = Llava()
    assert llava.canonical_name("vision_encoder.encoder_layers.2.attn.hook_out") == "vision.blocks.2.hook_attn_out"
    assert llava.canonical_name("vision_encoder.encoder_layers.2.attn.hook_pattern") == "vision.blocks.2.attn.hook_pattern"
    assert llava.canonical_name("blocks.10.mlp.gate.hook_out") == "blocks.10.mlp.hook_pre"
    assert llava.canonical_name("blocks.3.hook_resid_pre") == "blocks.3.hook_resid_pre"  # ours: left as it is
    assert Qwen2VL().canonical_name("blocks.3.hook_out") == "blocks.3.hook_out"  # no table: the bridge does not wrap it


def test_an_alias_renames_only_its_own_names():
    embed = CLIP_TOWER_ALIASES[0]
    assert embed.rename("vision_encoder.hook_vision_embed") == embed.rename("vision_encoder.embeddings.hook_out") == "vision.hook_embed"
    assert embed.rename("vision_encoder.embeddings.hook_in") is None


def test_an_alias_whose_names_hold_different_placeholders_is_refused():
    with pytest.raises(HookNameError, match="same placeholders"):
        alias("blocks.{layer}.hook_resid_post", "ln_final.hook_out")
