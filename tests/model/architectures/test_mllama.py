"""Llama 3.2 Vision (Mllama): a tiled tower with a local and a gated global encoder, a linear
projector, and an LLM that reads the images only as keys and values of its tanh-gated
cross-attention layers. The family tier's parity and spec tests run on its fixtures; the tier's
tests of image tokens in the LLM's sequence are replaced below by what Mllama has instead: a
cross-attended layout, the knockout of text -> image cross-attention (equal to Hugging Face with its
cross-attention mask edited by hand) and cross-attention head patching."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from mmlens.errors import InputError, LayoutMismatchError, UnsupportedModelError
from mmlens.interventions import (CacheMetric, Run, TokenGroup, bidirectional_image_attention, cross_attention_knockout,
                                  head_sweep, knockout)
from mmlens.model.images.layout import CrossAttendedLayout
from mmlens.testing.families.mllama import tiny_mllama

import family_tier as tier
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

family, eager, builder = tier.fixtures({"mllama": lambda attn: tiny_mllama(attn_implementation=attn)})
CROSS_LAYERS, N_HEADS = (1, 3), 4  # tiny_mllama's defaults
NO_IMAGE_TOKENS = "the LLM's sequence holds no image tokens on Mllama (its images are cross-attention keys)"


@pytest.mark.skip(reason=NO_IMAGE_TOKENS + ": test_cross_attended_layout_contract checks its layout instead")
def test_layout_contract():
    pass


@pytest.mark.skip(reason=NO_IMAGE_TOKENS + ": test_cross_attention_knockout_equals_hf_with_the_mask_edited_by_hand instead")
def test_knockout_equals_hf_with_its_mask():
    pass


@pytest.mark.skip(reason=NO_IMAGE_TOKENS + ": no image block to open; test_analyses_of_image_tokens_are_refused_by_name")
def test_bidirectional_edit_equals_the_bidirectional_mode():
    pass


@pytest.mark.skip(reason="TransformerLens 4.3 has no Mllama bridge, so the family has no bridge aliases")
def test_bridge_aliases_resolve_to_real_hook_points():
    pass


@torch.no_grad()
def test_cache_equals_hf_hidden_states(eager):
    """Hugging Face's hidden states in the cache; the adapter's output is what Hugging Face's
    projector gives on its tower's output, and each cross-attention layer's keys are its k_proj and
    k_norm of those features, one row of keys per batch row."""
    model, inputs = eager.model, eager.inputs
    _, cache = model.run_with_cache(inputs)
    reference = eager.reference
    ref = reference(**inputs.hf_kwargs(), output_hidden_states=True)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], ref.hidden_states[layer], atol=1e-5, rtol=0)
    extra = inputs.extra
    features = reference.model.vision_model(inputs.pixel_values, extra["aspect_ratio_ids"],
                                            extra["aspect_ratio_mask"]).last_hidden_state
    torch.testing.assert_close(cache["adapter.hook_in"], features, atol=1e-5, rtol=0)
    states = reference.model.multi_modal_projector(features)
    torch.testing.assert_close(cache["adapter.hook_out"], states, atol=1e-5, rtol=0)
    for layer in CROSS_LAYERS:
        attn = reference.model.language_model.layers[layer].cross_attn
        keys = attn.k_norm(attn.k_proj(states).flatten(1, 3).unflatten(-1, (-1, attn.head_dim)))
        assert cache[f"blocks.{layer}.cross_attn.hook_k"].shape == keys.shape  # before k_norm: [batch, key, head, d]
        torch.testing.assert_close(cache[f"blocks.{layer}.cross_attn.k_ln.hook_normalized"], keys, atol=1e-5, rtol=0)


def test_cross_attention_layers_have_their_own_points(eager):
    """The config marks Hugging Face's cross-attention layers; their blocks have `cross_attn` points and
    gates instead of `attn`, and saying `attn` on one explains why it is not there."""
    model = eager.model
    assert model.cfg.llm.cross_attention_layers == CROSS_LAYERS
    names = set(model.hook_names())
    for layer in CROSS_LAYERS:
        assert {f"blocks.{layer}.cross_attn.hook_{site}" for site in ("q", "k", "v", "attn_scores", "pattern", "z")} <= names
        assert {f"blocks.{layer}.hook_attn_gate", f"blocks.{layer}.hook_mlp_gate"} <= names
        assert not any(name.startswith(f"blocks.{layer}.attn.") for name in names)
        with pytest.raises(AttributeError, match="cross-attention block"):
            model.blocks[layer].attn
    assert "blocks.0.attn.hook_rot_q" in names and "vision.blocks.4.hook_resid_post" in names  # 3 local + 2 global


@torch.no_grad()
def test_cross_attended_layout_contract(eager):
    """One span per image, one segment per real tile; each tile's cells tile its part of the canvas; the
    layout's `llm` rows are cross-attention keys, its `vision` and `adapter` rows the same tiles' patches
    (CLS and padding left out); image positions in the text are refused by name."""
    model, inputs = eager.model, eager.inputs
    layout = inputs.layout
    assert isinstance(layout, CrossAttendedLayout)
    ratios = inputs.extra["aspect_ratio_ids"]
    assert [len(span.segments) for span in layout.spans] == [2, 1, 2]  # 1x2, 1x1 and 2x1 tiles
    assert ratios[:, 0].tolist() == [2, 1, 5]
    for span in layout.spans:
        height, width = span.canvas
        cover = torch.zeros(height, width, dtype=torch.long)
        for segment in span.segments:
            for y0, x0, y1, x1 in segment.tokens.boxes.tolist():
                cover[y0:y1, x0:x1] += 1
        assert (cover == 1).all(), "the tiles' cells tile the canvas once"
        assert len(span.special["cls"]) == len(span.segments)
    # image 2's canvas is its two tiles stacked: the pixels its cells' boxes live in
    canvas = model.architecture.image_pixels(inputs.pixel_values, 2, **inputs.extra)
    assert canvas.shape == (3, *layout.spans[2].canvas) == (3, 96, 48)
    assert torch.equal(canvas[:, 48:], inputs.pixel_values[2, 0, 1])
    _, cache = model.run_with_cache(inputs, names_filter=["blocks.1.cross_attn.hook_k", "adapter.hook_out",
                                                           "vision.blocks.4.hook_resid_post"])
    keys, adapter = cache["blocks.1.cross_attn.hook_k"], cache["adapter.hook_out"]
    assert keys.shape[1] == layout.seq_len and adapter.shape[:4] == layout.adapter_shape
    present = layout.table("llm").present
    # image 2 (row 2, slot 0) tile 1, patch 3: key (0 * 4 + 1) * 17 + 1 + 3; tower row 2, token 1 * 24 + 1 + 3
    row = int(present[2].nonzero()[16 + 3])
    attn = eager.reference.model.language_model.layers[1].cross_attn
    by_hand = attn.k_proj(adapter[2, 0, 1, 1 + 3])  # every head's key, concatenated
    torch.testing.assert_close(layout.gather("llm", keys)[2, row], by_hand, atol=1e-5, rtol=0)
    tower = cache["vision.blocks.4.hook_resid_post"]
    assert torch.equal(layout.gather("vision", tower)[2, row], tower[2, 1 * 24 + 1 + 3])
    assert torch.equal(layout.gather("adapter", adapter)[2, row], adapter[2, 0, 1, 1 + 3])
    with pytest.raises(LayoutMismatchError, match="no image tokens"):
        layout.image_token_mask()
    with pytest.raises(LayoutMismatchError, match="no image tokens"):
        layout.gather("llm", torch.zeros(*inputs.input_ids.shape, 2))


@torch.no_grad()
def test_cross_attention_knockout_equals_hf_with_the_mask_edited_by_hand(eager):
    """Cutting the last text token of every row off from image 0's first tile, and every text token of
    row 2 (the `<|image|>` placeholder is a text token here) off from its image's second tile, is Hugging Face run with those entries of its
    cross-attention mask set to 0 by hand: difference 0. No attention is left on a cut tile."""
    model, inputs = eager.model, eager.inputs
    last = cross_attention_knockout(model, inputs, TokenGroup.last(), images=[0], tiles=[0])
    second = cross_attention_knockout(model, last.inputs, TokenGroup.text(), images=[2], tiles=[1])
    mask = inputs.extra["cross_attention_mask"].clone()
    mask[0, -1, 0, 0] = 0
    mask[2, inputs.attention_mask[2].bool(), 0, 1] = 0
    assert torch.equal(second.inputs.extra["cross_attention_mask"], mask)
    theirs = eager.reference(**{**inputs.hf_kwargs(), "cross_attention_mask": mask}).logits
    ours = model(second.inputs)
    assert torch.equal(ours, theirs), f"difference {(ours - theirs).abs().max()}"
    assert set(last.blocked_mass) == set(CROSS_LAYERS) and all(m == 0.0 for m in second.blocked_mass.values())
    assert (ours - model(inputs)).abs().max() > 1e-4, "the knockout changed something"


@torch.no_grad()
def test_cross_attention_gates_ablate_what_text_reads_from_the_images(eager):
    """Zeroing both gates at every token is the Hugging Face model with its gate parameters at 0 (tanh 0)."""
    model, inputs = eager.model, eager.inputs
    zero = lambda x, hook: torch.zeros_like(x)  # noqa: E731
    hooks = [(f"blocks.{l}.hook_{g}_gate", zero) for l in CROSS_LAYERS for g in ("attn", "mlp")]
    ours = model.run_with_hooks(inputs, fwd_hooks=hooks)
    reference = eager.reference
    layers = reference.model.language_model.layers
    saved = {l: (layers[l].cross_attn_attn_gate.clone(), layers[l].cross_attn_mlp_gate.clone()) for l in CROSS_LAYERS}
    try:
        for l in CROSS_LAYERS:
            layers[l].cross_attn_attn_gate.zero_()
            layers[l].cross_attn_mlp_gate.zero_()
        theirs = reference(**inputs.hf_kwargs()).logits
    finally:
        for l, (attn_gate, mlp_gate) in saved.items():
            layers[l].cross_attn_attn_gate.copy_(attn_gate)
            layers[l].cross_attn_mlp_gate.copy_(mlp_gate)
    assert torch.equal(ours, theirs)
    assert (ours - model(inputs)).abs().max() > 1e-4


@torch.no_grad()
def test_cross_attention_head_sweep_equals_a_hand_loop(eager):
    """Patching each cross-attention head's z from a run on other images into the clean run, one head at
    a time, gives what a hand-written hook on that head gives."""
    model, inputs = eager.model, eager.inputs
    other = replace(inputs, pixel_values=torch.randn_like(inputs.pixel_values, generator=torch.Generator().manual_seed(1)))
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    metric = CacheMetric(lambda acts, inp: acts[last][:, -1].norm(dim=-1), [last])
    effects = head_sweep(model, Run(other), Run(inputs), metric, layers=list(CROSS_LAYERS))
    assert effects.shape == (len(CROSS_LAYERS), N_HEADS, len(inputs))
    _, source = model.run_with_cache(other, names_filter=lambda n: n.endswith("cross_attn.hook_z"))
    for i, layer in enumerate(CROSS_LAYERS):
        name = f"blocks.{layer}.cross_attn.hook_z"
        for head in range(N_HEADS):
            def put(z, hook, head=head):
                z = z.clone()
                z[:, :, head] = source[name][:, :, head]
                return z

            read = {}
            model.run_with_hooks(inputs, fwd_hooks=[(name, put), (last, lambda x, hook: read.__setitem__(last, x))])
            torch.testing.assert_close(effects[i, head], metric(read, inputs), atol=1e-5, rtol=1e-5)
    assert effects.std() > 0, "the images reach the metric through the heads"


def test_analyses_of_image_tokens_are_refused_by_name(eager):
    """What needs image tokens in the LLM's sequence says so, and where to look instead; so does a run
    from the LLM's input without the images."""
    model, inputs = eager.model, eager.inputs
    with pytest.raises(LayoutMismatchError, match="no image tokens"):
        knockout(model, inputs, queries=TokenGroup.text(), keys=TokenGroup.image(), layers=[0])
    with pytest.raises((InputError, LayoutMismatchError, ValueError), match="bidirectional|no image tokens"):
        with bidirectional_image_attention(model, inputs):
            model(inputs)
    with pytest.raises(InputError, match="needs the images"):
        model.architecture.llm_keywords(model.hf_model, {"input_ids": inputs.input_ids})
    # a cross-attention block's MLP is gated and dropped at text rows without tiles: no neuron expansion
    _, cache = model.run_with_cache(inputs)
    with pytest.raises(UnsupportedModelError, match="cross-attention block"):
        cache.get_neuron_results(1)


def test_hooked_generation_reads_the_cached_image_keys(eager):
    """Past the first generated token Hugging Face reads the cross-attention keys from its cache (the
    images' features are gone); the hooked maths reads the same cache, so generating with hooks that
    only read equals generating without, and a cross-attention point fires at every step."""
    model, inputs = eager.model, eager.inputs
    # an EOS id no row generates keeps Hugging Face's cached decoding for all four steps
    cached = dict(max_new_tokens=4, return_type="tokens", eos_token_id=model.cfg.d_vocab - 1)
    plain = model.generate(inputs, **cached)
    assert plain.shape[1] == inputs.input_ids.shape[1] + 4 and (plain[:, -4:] != model.cfg.d_vocab - 1).all()
    assert torch.equal(model.generate(inputs, max_new_tokens=4, return_type="tokens", stop_at_eos=False), plain), \
        "a full forward per token (the cross-attention mask extended per token) decodes the same"
    for point in ("blocks.1.hook_resid_post", "blocks.1.cross_attn.hook_pattern"):  # the block, or its attention alone
        seen = []
        with model.hooks(fwd_hooks=[(point, lambda x, hook: seen.append(tuple(x.shape)))]):
            assert torch.equal(model.generate(inputs, **cached), plain)
        assert len(seen) == 4 and seen[-1][-2 if "pattern" in point else 1] == 1  # the later steps: one query row
    keys = []  # computed once, at the first step, then read from the cache
    with model.hooks(fwd_hooks=[("blocks.1.cross_attn.hook_k", lambda x, hook: keys.append(x))]):
        model.generate(inputs, **cached)
    assert len(keys) == 1


def test_cross_attention_knockout_is_refused_without_cross_attention():
    from mmlens import HookedMLLM
    from mmlens.testing.families.llava import build_llava

    hf_model, processor = build_llava(seed=0)
    model = HookedMLLM.from_hf(hf_model, processor)
    inputs = model.prepare(tier.random_images(1), ["what"])
    with pytest.raises(UnsupportedModelError, match="no cross-attention layers"):
        cross_attention_knockout(model, inputs)


def test_probes_read_the_tower_and_the_cross_attention_keys(eager):
    """A probe sweep reads the tower, the adapter and a cross-attention layer's keys at every image's
    cells (the layout's cross-attended `llm` rows) and scores them on the tile canvas; a probe at text
    positions of the LLM is refused by name."""
    from mmlens.data import load_segmentation
    from mmlens.probing import probe_sweep

    model = eager.model
    scenes = load_segmentation("scenes", split="validation", n=12, seed=1, image_size=48)
    sites = ["vision.blocks.4.hook_resid_post", "adapter.hook_out", "blocks.1.cross_attn.hook_k"]
    sweep = probe_sweep(model, scenes, sites=sites, probe="ridge", progress=False, alpha=1e-2)
    assert set(sweep.table.hook) == set(sites) and np.isfinite(sweep.table.miou).all()
    with pytest.raises(LayoutMismatchError, match="no image tokens"):
        probe_sweep(model, scenes, sites=["blocks.0.hook_resid_post"], probe="ridge", progress=False, alpha=1e-2)
