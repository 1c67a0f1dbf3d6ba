"""Llama 4: tiles plus a global image with separator tokens between them, a tower with a 2-D complex
rotary and a trailing CLS token, pixel shuffle + MLP + linear adapter, and an LLM that interleaves
mixture-of-experts layers (sigmoid routing on the expert's input, a shared expert) with dense ones
and rotary chunked-attention layers (L2 q/k norms) with NoPE full-attention layers (temperature-
tuned queries). The family tier runs on its fixtures; the tests below cover what Llama 4 adds."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import InputError, LayoutMismatchError, UnsupportedModelError
from mmlens.interventions import ablate_experts
from mmlens.model.architectures.llama4 import LLAMA4_BLOCK, LLAMA4_MOE, Llama4
from mmlens.model.runtime.attention_masks import additive_mask
from mmlens.model.runtime.instrument import AttentionSpec
from mmlens.testing.families.llama4 import tiny_llama4

import family_tier as tier
from family_tier import assert_bridge_aliases
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

family, eager, builder = tier.fixtures({"llama4": lambda attn: tiny_llama4(attn_implementation=attn)})
N_EXPERTS, MOE_LAYERS, NOPE_LAYER = 4, (1, 3), 3  # tiny_llama4's defaults


@torch.no_grad()
def test_cache_equals_hf_hidden_states(eager):
    """Hugging Face's hidden states in the cache; its `image_hidden_states` (the tower's adapter
    output, before the projector) are `adapter.hook_hidden`, and what the projector made is what
    the LLM got at the layout's positions."""
    model, inputs = eager.model, eager.inputs
    _, cache = model.run_with_cache(inputs)
    ref = eager.reference(**inputs.hf_kwargs(), output_hidden_states=True)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], ref.hidden_states[layer], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["adapter.hook_hidden"], ref.image_hidden_states, atol=1e-5, rtol=0)
    layout, adapter, merged = inputs.layout, cache["adapter.hook_out"], cache["hook_multimodal_embed"]
    assert adapter.shape[:2] == layout.adapter_shape
    present = layout.table("llm").present
    assert torch.equal(layout.gather("adapter", adapter)[present], layout.gather("llm", merged)[present])


def test_layers_route_rotate_and_chunk_as_configured(eager):
    """`cfg.llm.moe` lists the layers Hugging Face built a `Llama4TextMoe` for, with a shared expert;
    the others keep the dense MLP's points. The rotary layers are the chunked ones, the NoPE layer
    the one full-attention layer, as Hugging Face's `layer_types` says."""
    model, reference = eager.model, eager.reference
    layers = reference.language_model.model.layers
    moe = model.cfg.llm.moe
    assert moe.layers == MOE_LAYERS == tuple(l for l, layer in enumerate(layers) if layer.is_moe_layer)
    assert (moe.n_experts, moe.shared_expert, model.cfg.llm.d_mlp) == (N_EXPERTS, True, layers[0].feed_forward.gate_proj.out_features)
    names = set(model.hook_names())
    assert {"blocks.0.mlp.hook_pre", "blocks.1.mlp.shared_expert.hook_out", "blocks.3.mlp.experts.3.hook_out"} <= names
    assert "blocks.1.mlp.hook_pre" not in names
    types = reference.config.text_config.layer_types
    assert model.architecture.image_attention_layers(model.cfg) == (NOPE_LAYER,) == tuple(
        l for l, layer in enumerate(layers) if not layer.self_attn.use_rope)
    assert [t == "chunked_attention" for t in types] == [bool(layer.self_attn.use_rope) for layer in layers]


@torch.no_grad()
def test_query_and_key_points_hold_llama4s_positions(eager):
    """`hook_rot_q` / `hook_rot_k` are the queries and keys as they enter the scores: rotated and
    L2-normalised (RMS 1 per head, up to the norm's eps) on a rotary layer; on the NoPE layer the keys unrotated and
    the queries scaled by 1 + attn_scale * log(1 + floor((pos + 1) / floor_scale)), which grows
    along the tiny model's prompts."""
    model, inputs = eager.model, eager.inputs
    names = [f"blocks.{l}.attn.hook_{p}" for l in (0, NOPE_LAYER) for p in ("q", "k", "rot_q", "rot_k")]
    _, cache = model.run_with_cache(inputs, names_filter=names)
    eps = eager.reference.config.text_config.rms_norm_eps
    for point in ("q", "k"):  # the rotation keeps each head's norm; the L2 norm takes it to 1 (up to its eps)
        before = cache[f"blocks.0.attn.hook_{point}"].pow(2).mean(-1)
        rms = cache[f"blocks.0.attn.hook_rot_{point}"].pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, (before / (before + eps)).sqrt(), atol=1e-5, rtol=0)
    text = eager.reference.config.text_config
    assert torch.equal(cache[f"blocks.{NOPE_LAYER}.attn.hook_rot_k"], cache[f"blocks.{NOPE_LAYER}.attn.hook_k"])
    positions = torch.arange(inputs.input_ids.shape[1]).float()
    scale = torch.log1p(torch.floor((positions + 1) / text.floor_scale)) * text.attn_scale + 1
    assert scale.max() > 1.2
    expected = cache[f"blocks.{NOPE_LAYER}.attn.hook_q"] * scale[None, :, None, None]
    torch.testing.assert_close(cache[f"blocks.{NOPE_LAYER}.attn.hook_rot_q"], expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_per_layer_type_masks_equal_hugging_faces(eager):
    """`hf_attention_mask` of the model's own edges is what Hugging Face builds itself: a full mask
    for the NoPE layer, chunks counted from each row's first real token for the rotary layers. The
    chunks matter: dropping them changes the logits."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    edges = model.attention_edges(inputs)
    plain = {k: v for k, v in inputs.hf_kwargs().items() if k != "attention_mask"}
    masks = model.architecture.hf_attention_mask(edges)
    assert set(masks) == {"full_attention", "chunked_attention"}
    own = reference(**inputs.hf_kwargs()).logits
    given = reference(**plain, attention_mask=masks).logits
    unchunked = reference(**plain, attention_mask={"full_attention": additive_mask(edges), "chunked_attention": additive_mask(edges)}).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(given[valid], own[valid], atol=1e-6, rtol=0)
    assert (unchunked - own)[valid].abs().max() > 1e-4


@torch.no_grad()
def test_routing_points_hold_hf_routing(eager):
    """The router logits are Hugging Face's router's, [batch, pos, n_experts]; the chosen experts are
    its top-k logits and their weights the sigmoid of those logits (not renormalised), bit for bit."""
    model, inputs = eager.model, eager.inputs
    names = ["blocks.1.ln2.hook_normalized", "blocks.1.mlp.hook_router_logits", "blocks.1.mlp.hook_expert_indices",
             "blocks.1.mlp.hook_expert_weights"]
    _, cache = model.run_with_cache(inputs, names_filter=names)
    router = eager.reference.language_model.model.layers[1].feed_forward.router
    scores, logits = router(cache[names[0]].flatten(0, 1))
    assert torch.equal(cache[names[1]].flatten(0, 1), logits)
    top, chosen = torch.topk(logits, router.top_k, dim=-1)
    assert torch.equal(cache[names[2]].flatten(0, 1), chosen)
    assert torch.equal(cache[names[3]].flatten(0, 1), torch.sigmoid(top))
    assert len(set(chosen.flatten().tolist())) == N_EXPERTS, "the tiny model's tokens use every expert"


@torch.no_grad()
def test_patching_one_expert_equals_a_hook_on_hf_experts(eager):
    """With every expert point cached, the routed experts' `hook_out` plus the shared expert's are the
    MoE output; doubling one expert's output equals a hand-written hook doubling that expert's rows
    of Hugging Face's experts module (which runs every expert on every token, unchosen ones on zeros),
    and `ablate_experts` equals zeroing an expert's rows there."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    _, cache = model.run_with_cache(inputs, names_filter=lambda name: name.startswith("blocks.1.") and
                                    ("mlp" in name))
    routed = sum(cache[f"blocks.1.mlp.experts.{e}.hook_out"] for e in range(N_EXPERTS))
    torch.testing.assert_close(routed + cache["blocks.1.mlp.shared_expert.hook_out"], cache["blocks.1.hook_mlp_out"],
                               atol=1e-6, rtol=0)
    ours = model.run_with_hooks(inputs, fwd_hooks=[("blocks.1.mlp.experts.2.hook_out", lambda x, hook: 2 * x)])
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], _hf_with_expert_scaled(reference, inputs, 1, 2, 2.0)[valid], atol=1e-5, rtol=0)
    assert (ours - model(inputs))[valid].abs().max() > 1e-4, "the patch changed something"
    with ablate_experts(model, inputs, {3: [1]}) as ablation:  # the interventions API, against the same kind of hook
        ablated = model(inputs)
    torch.testing.assert_close(ablated[valid], _hf_with_expert_scaled(reference, inputs, 3, 1, 0.0)[valid], atol=1e-5, rtol=0)
    assert ablation.ablated[3] > 0


def _hf_with_expert_scaled(reference, inputs, layer: int, expert: int, factor: float) -> torch.Tensor:
    """Hugging Face's logits with expert `expert`'s rows of layer `layer`'s experts module (every
    expert on every token, `[n_experts * tokens, d_model]`) multiplied by `factor`, by a forward hook."""

    def scale(_module, _args, out):
        out = out.clone()
        out.view(N_EXPERTS, -1, out.shape[-1])[expert] *= factor
        return out

    handle = reference.language_model.model.layers[layer].feed_forward.experts.register_forward_hook(scale)
    try:
        return reference(**inputs.hf_kwargs()).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("misread", ["weights_on", "renormalize"])
def test_a_routing_the_spec_misreads_is_refused(builder, monkeypatch, misread):
    """Weighting the experts' outputs instead of their inputs, or renormalising the sigmoid weights,
    leaves plain logits exact; loading refuses the spec, naming the first MoE block."""
    hf_model, processor = builder()
    wrong = replace(LLAMA4_MOE, weights_on="output") if misread == "weights_on" else replace(LLAMA4_MOE, renormalize=True)
    monkeypatch.setattr(Llama4, "llm_block", replace(LLAMA4_BLOCK, moe=wrong))
    with pytest.raises(UnsupportedModelError, match=r"blocks\.1 .*does not match its block spec"):
        HookedMLLM.from_hf(hf_model, processor)


def test_unsupported_parts_are_refused_by_name(builder):
    """An attention backend whose mask the hooked attention cannot read, and a pixel shuffle that
    does not fold whole squares of patches, are refused at load, naming them and what to do."""
    hf_model, processor = builder()
    hf_model.config.text_config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="flex_attention.*load with attn_implementation='eager' or 'sdpa'"):
        HookedMLLM.from_hf(hf_model, processor)
    hf_model.config.text_config._attn_implementation = "eager"
    hf_model.config.vision_config.pixel_shuffle_ratio = 0.4
    with pytest.raises(UnsupportedModelError, match="pixel_shuffle_ratio=0.4"):
        HookedMLLM.from_hf(hf_model, processor)


def test_tiles_global_image_and_separators(eager):
    """Each image is its joined tile grid then its global image, both on the original image; the
    separators, start, end and `<|image|>` are specials outside the grids, where the processor put
    them. An image of one tile is that padded tile alone; tokens over padding have empty boxes."""
    model, inputs = eager.model, eager.inputs
    ids = inputs.input_ids.cpu()
    tokens = model.processor.tokenizer.convert_tokens_to_ids
    k = model.cfg.adapter.token_grid[0]
    grids = []
    for span, image in zip(inputs.layout.spans, tier.random_images(3)):
        assert span.canvas == (image.height, image.width)
        tiles, glob = span.segments
        assert (tiles.kind, glob.kind, glob.tokens.shape) == ("tiles", "global", (k, k))
        rows, cols = tiles.tokens.rows // k, tiles.tokens.cols // k
        grids.append((rows, cols))
        expected = {"start": 1, "tile_separator": rows * (cols - 1), "row_break": rows, "global_tag": 1, "end": 1}
        assert {kind: len(p) for kind, p in span.special.items()} == expected
        for kind, name in (("start", "<|image_start|>"), ("tile_separator", "<|tile_x_separator|>"),
                           ("row_break", "<|tile_y_separator|>"), ("global_tag", "<|image|>"), ("end", "<|image_end|>")):
            assert (ids[span.row, span.special[kind]] == tokens(name)).all()
        assert int(glob.positions[0]) == int(span.special["global_tag"][0]) + 1
    assert grids == [(2, 3), (2, 2), (3, 2)]
    padded = inputs.layout.spans[0].segments[0].tokens  # 40x50 resized to 32x40 in a 32x48 canvas
    assert padded.x_edges[-2:].tolist() == [50, 50], "the last token column covers padding only"
    single = model.prepare([Image.fromarray(np.zeros((12, 9, 3), np.uint8))], "hi")
    (span,) = single.layout.spans
    assert [s.kind for s in span.segments] == ["tiles"] and span.segments[0].tokens.shape == (k, k)
    assert set(span.special) == {"start", "global_tag", "end"} and len(single.pixel_values) == 1


@torch.no_grad()
def test_pixel_shuffle_addressing(eager):
    """The adapter reads the tower's normalised output without its trailing CLS token, and a change
    to one patch reaches only the token the layout says that patch feeds."""
    model, inputs = eager.model, eager.inputs
    _, cache = model.run_with_cache(inputs, names_filter=["adapter.hook_in", "vision.ln_post.hook_normalized",
                                                          "adapter.hook_hidden"])
    normalized = cache["vision.ln_post.hook_normalized"]
    assert torch.equal(cache["adapter.hook_in"], normalized[:, :-1])
    segment = inputs.layout.spans[1].segments[0]
    frame, patch = int(segment.vision_index[0][5]), int(segment.vision_index[1][5])

    def nudge(x, hook):
        x = x.clone()
        x[frame, patch] += 1.0
        return x

    read = {}
    model.run_with_hooks(inputs, fwd_hooks=[("adapter.hook_in", nudge),
                                            ("adapter.hook_hidden", lambda x, hook: read.setdefault("x", x))])
    changed = (read["x"] - cache["adapter.hook_hidden"]).abs().amax(-1) > 0
    token = int(segment.patch_to_token[5])
    assert changed.nonzero().tolist() == [[int(segment.adapter_index[0][token]), int(segment.adapter_index[1][token])]]


def test_image_as_the_tower_saw_it(eager):
    """An image's picture (recovery maps draw on it) is its own tiles put back in their grid and
    cropped to the resized image, without the processor's padding."""
    model, inputs = eager.model, eager.inputs
    tile = model.cfg.vision.image_size
    span = inputs.layout.spans[-1]  # 61 x 37: 3 x 2 tiles, the image 48 x 29 of their 48 x 32
    picture = model.architecture.image_pixels(inputs.pixel_values, span.image_index, **inputs.layout_inputs)
    assert picture.shape == (3, 48, 29)
    first = int(span.segments[0].vision_index[0].min())
    assert first == len(inputs.pixel_values) - 3 * 2 - 1
    assert torch.equal(picture[:, tile:2 * tile, tile:], inputs.pixel_values[first + 3][:, :, :29 - tile])
    with pytest.raises(InputError, match="image_sizes"):
        model.architecture.image_pixels(inputs.pixel_values, 0)


@torch.no_grad()
def test_vision_knockout_equals_hf_with_its_mask(eager, monkeypatch):
    """A knockout in the tower = Hugging Face's own vision attention given the blocked edges as a
    mask (its layers pass none, so the mask goes in through its eager attention function)."""
    import transformers.models.llama4.modeling_llama4 as hf

    tier.assert_vision_knockout_equals_hf_attention(eager, monkeypatch, hf, "vision_eager_attention_forward")


BRIDGE_NAMES = {
    "blocks.1.mlp.hook_router_scores": "blocks.1.mlp.hook_router_logits",
    "blocks.0.mlp.dense_gate.hook_out": "blocks.0.mlp.hook_pre",
    "blocks.2.mlp.dense_out.hook_in": "blocks.2.mlp.hook_post",
    "blocks.1.mlp.shared_expert.gate.hook_out": "blocks.1.mlp.shared_expert.hook_pre",
    "blocks.3.mlp.hook_out": "blocks.3.hook_mlp_out",
    "blocks.2.hook_out": "blocks.2.hook_resid_post",
    "vision_encoder.hook_out": "adapter.hook_hidden",
    "vision_projector.hook_out": "adapter.hook_out",
}


def test_bridge_hook_names_are_aliases(eager):
    """TransformerBridge's Llama 4 names (TL 4.3's llama4_multimodal adapter) resolve to ours; the
    plain LLM's `mlp.gate.hook_out` names nothing on this stack."""
    assert_bridge_aliases(eager.model, eager.inputs, BRIDGE_NAMES)
    for name in ("blocks.0.mlp.gate.hook_out", "blocks.1.mlp.dense_gate.hook_out"):
        with pytest.raises(Exception, match="unknown hook name"):
            eager.model.resolve_hook_name(name)


def test_every_analysis_runs(eager):
    # 48 px scenes: 2 x 2 tiles and the global image each
    scenes = load_segmentation("scenes", split="validation", n=24, seed=1, image_size=48)
    heads = tier.every_analysis_runs(eager.model, scenes)
    tile = eager.model.cfg.vision.image_size
    assert heads.maps[0].image.shape[:2] == (2 * tile, 2 * tile), "recovery maps show the tiles, not one frame"


def test_inputs_that_do_not_match_are_refused(eager):
    """Sizes whose tiling differs from the prompt's tokens, frames missing from `pixel_values`, and a
    layout asked for without the sizes are refused, saying what was wrong and what to do."""
    model, inputs = eager.model, eager.inputs
    sizes = inputs.layout_inputs["image_sizes"]
    wrong = sizes.clone()
    wrong[0] = torch.tensor([32, 32])  # 2 x 2 tiles, where the prompt holds 2 x 3
    with pytest.raises(LayoutMismatchError, match=r"image 0 of size \(32, 32\) is 2 x 2 tiles.*processor"):
        model.layout(inputs.input_ids, image_sizes=wrong)
    with pytest.raises(InputError, match="image_sizes"):
        model.layout(inputs.input_ids)
    with pytest.raises(InputError, match="frames .* need .* image tokens"):
        model.architecture.check_inputs(model.cfg, inputs.input_ids, inputs.pixel_values[:-1], image_sizes=sizes)


def test_a_tower_spec_without_its_rotary_is_refused(builder, monkeypatch):
    """A tower spec that drops the 2-D rotary leaves plain logits exact; loading refuses it."""
    hf_model, processor = builder()
    monkeypatch.setattr(Llama4, "vision_block", replace(Llama4.vision_block, attention=AttentionSpec(rotary=False)))
    with pytest.raises(UnsupportedModelError, match=r"vision\.blocks\.0 .*does not match its block spec"):
        HookedMLLM.from_hf(hf_model, processor)
