"""The hook-name grammar: every name of two families' models parses into the stage, block and site
where its hook point lives and builds back to itself, and what the grammar says about a site (a
head dimension, an attention map, its place around `hook_z`) holds in a real forward."""

from __future__ import annotations

import pytest
import torch

from mmlens import HookedMLLM
from mmlens.errors import HookNameError
from mmlens.model.hook_names import HookName, NameTemplate, block_hook, parse_hook_name
from mmlens.testing_families import tiny_qwen3_vl


@pytest.fixture(scope="module")
def qwen3_vl() -> HookedMLLM:
    """Qwen3-VL: rotary vision blocks, q/k norms in the LLM and deepstack points in the adapter."""
    return HookedMLLM.from_hf(*tiny_qwen3_vl())


def _stage_module(model: HookedMLLM, stage: str):
    return {"vision": model.vision, "adapter": model.adapter, "llm": model}[stage]


@pytest.mark.parametrize("family", ["tiny_clip", "qwen3_vl"])
def test_every_hook_name_parses_to_where_its_point_lives(family, request):
    fixture = request.getfixturevalue(family)
    model = fixture if isinstance(fixture, HookedMLLM) else fixture.model
    names = model.hook_names()
    assert any(n.startswith("adapter.") for n in names) and any(n.startswith("vision.blocks.") for n in names)
    for name in names:
        parsed = parse_hook_name(name)
        assert parsed.name == str(parsed) == name
        point = model.hook_dict[name]
        stage = _stage_module(model, parsed.stage)
        assert any(m is point for m in stage.modules()), f"{name} is not under the {parsed.stage} stage's module"
        if parsed.stage == "llm":
            assert not any(m is point for m in (*model.vision.modules(), *model.adapter.modules()))
        if parsed.layer is None:
            assert stage.get_submodule(parsed.site) is point
            assert not any(point is m for block in getattr(stage, "blocks", ()) for m in block.modules())
            with pytest.raises(ValueError, match="no layer"):
                point.layer()
        else:
            assert stage.blocks[parsed.layer].get_submodule(parsed.site) is point
            assert point.layer() == parsed.layer
            assert block_hook(parsed.layer, parsed.site, parsed.stage) == name
    deepstack = [parse_hook_name(n) for n in names if ".deepstack." in n]
    assert family == "tiny_clip" or deepstack and all(p.stage == "adapter" and p.layer is None for p in deepstack)


@torch.no_grad()
def test_head_and_attention_map_sites_have_those_shapes(tiny_clip):
    """Per-head sites are [batch, pos, head, d] and attention maps [batch, head, query, key];
    every other point of this model (no q/k norms) has at most three dims."""
    model, inputs = tiny_clip.model, tiny_clip.inputs
    # hook_result fires only after set_use_attn_result(True)
    wanted = [n for n in model.hook_names() if (p := parse_hook_name(n)).layer in (None, 0) and p.point != "hook_result"]
    _, cache = model.run_with_cache(inputs, names_filter=wanted)
    heads = {"llm": (model.cfg.n_heads, model.cfg.llm.n_key_value_heads or model.cfg.n_heads),
             "vision": (model.cfg.vision.n_heads,)}
    seen = {"per_head": 0, "query_by_key": 0}
    for name in cache.keys():
        parsed, activation = parse_hook_name(name), cache[name]
        if parsed.per_head:
            assert activation.ndim == 4 and activation.shape[2] in heads[parsed.stage], name
            seen["per_head"] += 1
        elif parsed.query_by_key:
            assert activation.ndim == 4 and activation.shape[-1] == activation.shape[-2], name
            assert activation.shape[1] in heads[parsed.stage], name
            seen["query_by_key"] += 1
        else:
            assert activation.ndim <= 3, name
    assert seen["per_head"] >= 8 and seen["query_by_key"] == 4


@torch.no_grad()
@pytest.mark.parametrize("stage", ["llm", "vision"])
def test_sites_at_or_after_z_fire_after_z_and_the_rest_before(tiny_clip, stage):
    """Hooks on every point of one block fire in the order the grammar states: a site it places at
    or after the attention's `hook_z` fires from `hook_z` on, every other site before it."""
    model, inputs = tiny_clip.model, tiny_clip.inputs
    block = [n for n in model.hook_names()
             if (p := parse_hook_name(n)).stage == stage and p.layer == 1 and p.point != "hook_result"]
    order: list[str] = []
    model.run_with_hooks(inputs, fwd_hooks=[(n, lambda x, hook: order.append(hook.name)) for n in block])
    z = order.index(block_hook(1, "attn.hook_z", stage))
    for index, name in enumerate(order):
        parsed = parse_hook_name(name)
        assert parsed.at_or_after_z == (index >= z), f"{name} fired {'after' if index > z else 'before'} hook_z"
        if parsed.before_z_in_attention:
            assert index < z
    assert sum(parse_hook_name(n).before_z_in_attention for n in order) >= 5, "q, k, v, scores and pattern fired"


def test_names_outside_the_grammar_are_clear_errors():
    for bad in ["", "blocks.x.hook_z", "blocks.3", "vision.blocks.03.hook_z", "blocks.3..hook_z", "adapter.", ["blocks.0.hook_z"], None]:
        with pytest.raises(HookNameError):
            parse_hook_name(bad)
    with pytest.raises(HookNameError, match="stage"):
        HookName("audio", 0, "hook_resid_pre")
    with pytest.raises(HookNameError, match="layer"):
        HookName("llm", -1, "hook_resid_pre")


def test_what_a_name_says():
    z, final, embed = (parse_hook_name(n) for n in ("blocks.2.attn.hook_z", "ln_final.hook_normalized", "hook_embed"))
    assert (z.stage, z.layer, z.site, z.point) == ("llm", 2, "attn.hook_z", "hook_z")
    assert z.per_head and z.at_or_after_z and not z.before_z_in_attention and z.in_llm_layers
    assert final.in_llm_layers and final.layer is None and not final.at_or_after_z
    assert not embed.in_llm_layers and not parse_hook_name("vision.blocks.0.hook_resid_pre").in_llm_layers
    # a cross-attention block's per-head points and per-head q/k norms carry a head dimension too (Mllama)
    for site in ("cross_attn.hook_z", "cross_attn.q_ln.hook_normalized", "cross_attn.k_ln.hook_scale"):
        assert parse_hook_name(f"blocks.1.{site}").per_head, site
    assert parse_hook_name("adapter.hook_out").per_image and not z.per_image
    assert parse_hook_name("blocks.0.attn.q_ln.hook_scale").before_z_in_attention


@torch.no_grad()
@pytest.mark.parametrize("site", ["hook_resid_pre", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "hook_mlp_out",
                                  "hook_resid_post"])
def test_first_block_after_is_the_first_attention_an_edit_reaches(tiny_clip, site):
    """`first_block_after` (the knockout window's start) is the first LLM block whose attention
    input moves when the point is edited."""
    model, inputs = tiny_clip.model, tiny_clip.inputs
    name = block_hook(0, site)
    inputs_to_attention = [block_hook(layer, "ln1.hook_normalized") for layer in range(model.cfg.n_layers)]
    _, clean = model.run_with_cache(inputs, names_filter=inputs_to_attention)
    with model.hooks(fwd_hooks=[(name, lambda x, hook: x + 1.0)]):
        _, edited = model.run_with_cache(inputs, names_filter=inputs_to_attention)
    moved = [layer for layer, n in enumerate(inputs_to_attention) if not torch.equal(clean[n], edited[n])]
    assert moved and moved[0] == parse_hook_name(name).first_block_after(model.cfg.n_layers)


def test_points_outside_the_blocks_come_before_the_first_block_or_after_the_last():
    assert parse_hook_name("hook_multimodal_embed").first_block_after(4) == 0
    assert parse_hook_name("vision.hook_embed").first_block_after(4) == 0
    assert parse_hook_name("ln_final.hook_normalized").first_block_after(4) == 4
    assert parse_hook_name("vision.ln_post.hook_scale").first_block_after(4) == 4
    assert parse_hook_name("blocks.0.attn.q_ln.hook_normalized").per_head


def test_a_name_template_reads_and_writes_its_placeholders():
    template = NameTemplate("vision_encoder.encoder_layers.{layer}.attn.hook_{point}")
    assert template.placeholders == {"layer", "point"}
    assert template.match("vision_encoder.encoder_layers.12.attn.hook_attn_scores") == {"layer": "12", "point": "attn_scores"}
    assert template.fill(layer=3, point="z") == "vision_encoder.encoder_layers.3.attn.hook_z"
    # dots are dots, a layer is written as the grammar writes it, a point is one word, the match is whole
    for other in ["vision_encoder.encoder_layersX3.attn.hook_z", "vision_encoder.encoder_layers.03.attn.hook_z",
                  "vision_encoder.encoder_layers.x.attn.hook_z", "vision_encoder.encoder_layers.3.attn.hook_q.hook_z",
                  "vision_encoder.encoder_layers.3.attn.hook_z.extra"]:
        assert template.match(other) is None, other
    assert NameTemplate("ln_final.hook_out").match("ln_final.hook_out") == {}
    for bad in ["blocks.{head}.hook_z", "blocks.{layer}.{layer}", "blocks.{layer:02d}.hook_z"]:
        with pytest.raises(HookNameError, match="placeholders"):
            NameTemplate(bad)


def test_a_name_within_its_stage_is_tls_name_for_a_single_stack():
    assert parse_hook_name("vision.blocks.3.attn.hook_z").name_in_stage == "blocks.3.attn.hook_z"
    assert parse_hook_name("adapter.hook_out").name_in_stage == "hook_out"
    assert parse_hook_name("blocks.1.hook_resid_post").name_in_stage == "blocks.1.hook_resid_post"


def test_in_an_llm_block_means_an_llm_point_with_a_layer():
    assert parse_hook_name("blocks.2.attn.hook_z").in_llm_block
    assert not parse_hook_name("vision.blocks.2.attn.hook_z").in_llm_block
    assert not parse_hook_name("ln_final.hook_normalized").in_llm_block
    assert parse_hook_name("ln_final.hook_normalized").in_llm_layers
