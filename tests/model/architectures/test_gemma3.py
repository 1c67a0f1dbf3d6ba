"""Gemma 3: SigLIP tower, 4x4 average pooling into the LLM tokens, a Gemma 3 LLM (sandwich norms,
q/k norms, query_pre_attn_scalar, sliding-window layers) and image tokens that attend to each other
both ways by design (token_type_ids)."""

from __future__ import annotations

import einops
import pytest
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import HookNameError, UnsupportedModelError
from mmlens.interventions import TokenGroup, knockout
from mmlens.model.architectures.llava import LLM_BLOCK
from mmlens.model.runtime.attention_masks import additive_mask
from mmlens.model.images.preprocess import ImageGeometry
from mmlens.testing_families import tiny_gemma3

import family_tier as tier
from conftest import random_images
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

family, eager, builder = tier.fixtures({"gemma3": lambda attn: tiny_gemma3(attn_implementation=attn)})


def test_sixteen_patches_feed_each_token_and_image_markers_stay_outside_the_grid(eager):
    model, inputs = eager.model, eager.inputs
    layout, tokenizer = inputs.layout, model.processor.tokenizer
    assert layout.patch_grid.shape == (12, 12) and layout.token_grid.shape == (3, 3)
    assert torch.equal(torch.bincount(layout.patch_to_token), torch.full((9,), 16))
    for patch, token in enumerate(layout.patch_to_token.tolist()):  # a token's box holds its 16 patches
        py0, px0, py1, px1 = layout.patch_grid.boxes[patch].tolist()
        ty0, tx0, ty1, tx1 = layout.token_grid.boxes[token].tolist()
        assert ty0 <= py0 and py1 <= ty1 and tx0 <= px0 and px1 <= tx1
    types = inputs.extra["token_type_ids"]
    assert torch.equal(layout.image_token_mask(), types.bool().cpu()), "the grid is exactly Hugging Face's image block"
    ids = inputs.input_ids.cpu()
    for kind, token in (("start", tokenizer.boi_token_id), ("end", tokenizer.eoi_token_id)):
        markers = layout.special_positions(kind)
        assert torch.equal(markers, ids == token) and not (markers & layout.image_token_mask()).any()
        assert (layout.image_of_position()[markers] == -1).all(), "the markers are outside the image's block"
    assert "<img0 start>" in model.to_str_tokens(inputs)[0]


@torch.no_grad()
def test_adapter_points_are_the_pooled_tokens(eager):
    model, inputs = eager.model, eager.inputs
    _, cache = model.run_with_cache(inputs, names_filter=["vision.ln_post.hook_normalized", "adapter.hook_in",
                                                          "adapter.hook_hidden", "adapter.hook_out"])
    patches = cache["vision.ln_post.hook_normalized"]  # what the projector receives
    pooled = einops.reduce(patches, "n (r kr c kc) d -> n (r c) d", "mean", r=3, kr=4, c=3, kc=4)
    torch.testing.assert_close(cache["adapter.hook_in"], pooled, atol=1e-6, rtol=0)
    projector = eager.reference.model.multi_modal_projector
    torch.testing.assert_close(cache["adapter.hook_hidden"], projector.mm_soft_emb_norm(pooled), atol=1e-6, rtol=0)
    features = model.layout(inputs).gather("adapter", cache["adapter.hook_out"])
    assert features.shape == (inputs.layout.n_images, 9, model.cfg.d_model)


@torch.no_grad()
def test_bidirectional_images_are_the_own_rule_and_causal_removes_it(eager):
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    assert model.image_attention == "bidirectional"
    plain = {"input_ids": inputs.input_ids, "pixel_values": inputs.pixel_values}
    valid = inputs.attention_mask.bool()
    own = model(inputs)
    # our reading of the rule (image blocks both ways, sliding layers windowed), as 4D masks per
    # layer type, is what Hugging Face builds from token_type_ids
    edges = model.attention_edges(inputs)
    as_masks = reference(**plain, attention_mask=model.architecture.hf_attention_mask(edges)).logits
    torch.testing.assert_close(as_masks[valid], own[valid], atol=1e-5, rtol=0)
    unwindowed = reference(**plain, attention_mask=additive_mask(edges)).logits
    assert (unwindowed - own)[valid].abs().max() > 1e-4, "the test batch must reach past the sliding window"
    with model.using_image_attention("causal"):
        causal = model(inputs)
        assert not (model.attention_edges(inputs) & ~torch.ones_like(edges).tril()).any()
        without_ids = model(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values,
                            attention_mask=inputs.attention_mask)
    torch.testing.assert_close(causal, reference(**plain, attention_mask=inputs.attention_mask).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(without_ids, causal, atol=0, rtol=0)
    assert (causal - own)[valid].abs().max() > 1e-4, "forcing causal attention changes the logits"
    # without token_type_ids the own rule still holds: they are derived from the image tokens
    derived = model(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask)
    torch.testing.assert_close(derived, own, atol=0, rtol=0)


@torch.no_grad()
def test_a_generated_token_is_text_for_the_attention_rule(eager):
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    extra = model.architecture.extend_by_one_token(dict(inputs.extra))
    next_token = model(inputs)[:, -1].argmax(-1, keepdim=True)
    ids = torch.cat([inputs.input_ids, next_token], dim=1)
    mask = torch.cat([inputs.attention_mask, torch.ones_like(next_token)], dim=1)
    assert torch.equal(extra["token_type_ids"], (ids == model.cfg.image_token_id).long())
    grown = {"input_ids": ids, "pixel_values": inputs.pixel_values, "attention_mask": mask, **extra}
    assert torch.equal(model(grown), reference(**grown).logits)


@torch.no_grad()
def test_vision_knockout_equals_hf_with_its_mask(eager):
    """Blocking the top-left LLM token in the tower blocks its 16 patches; HF's own SigLIP layers
    with that 4D mask in layer 0 give the same adapter output."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    ko = knockout(model, inputs, queries=TokenGroup.image(), keys=TokenGroup.box(0, 0, 1, 1), layers=[0],
                  stage="vision", verify=True)
    assert int(ko.blocked[0].any(dim=0).sum()) == 16
    with ko:
        _, cache = model.run_with_cache(inputs, names_filter="adapter.hook_out")
    assert ko.blocked_mass[0] == 0.0
    tower = reference.model.vision_tower
    hidden = tower.embeddings(inputs.pixel_values)
    for i, layer in enumerate(tower.encoder.layers):
        hidden = layer(hidden, additive_mask(~ko.blocked.cpu()) if i == 0 else None)
    theirs = reference.model.multi_modal_projector(tower.post_layernorm(hidden))
    torch.testing.assert_close(cache["adapter.hook_out"], theirs, atol=1e-5, rtol=0)
    assert (theirs - reference.model.get_image_features(inputs.pixel_values).pooler_output).abs().max() > 1e-4


@torch.no_grad()
def test_norm_weights_are_gemmas_one_plus_weight(eager):
    """`w` is the factor Gemma's RMSNorms apply (1 + weight), so the cache's cached-scale norm of the
    last residual (`ln_final.hook_normalized`: before the weight, which TL's fold_ln leaves to the
    unembedding) times the final norm's `w` is Hugging Face's final norm output."""
    model, inputs = eager.model, eager.inputs
    _, cache = model.run_with_cache(inputs)
    last = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    normed = cache.apply_ln_to_stack(last[None], layer=None)[0]
    torch.testing.assert_close(normed, cache["ln_final.hook_normalized"], atol=1e-5, rtol=1e-5)
    hf_norm = eager.model.hf_model.model.language_model.norm
    torch.testing.assert_close(normed * model.ln_final.w, hf_norm(last), atol=1e-5, rtol=1e-5)
    block = model.blocks[0]
    for norm, module in ((block.ln1_post, eager.model.hf_model.model.language_model.layers[0].post_attention_layernorm),
                         (block.attn.q_ln, eager.model.hf_model.model.language_model.layers[0].self_attn.q_norm)):
        torch.testing.assert_close(norm.w, module.weight + 1, atol=0, rtol=0)


def test_bridge_names_are_aliases(eager):
    """TransformerLens 4.3's Gemma 3 bridge names; its pre-sandwich-norm branch outputs have no
    counterpart and are refused, not mapped to the post-norm sublayer outputs."""
    resolve = eager.model.resolve_hook_name
    assert resolve("blocks.1.ln1_post.hook_out") == "blocks.1.ln1_post.hook_normalized"
    assert resolve("blocks.0.ln2_post.hook_out") == "blocks.0.ln2_post.hook_normalized"
    assert resolve("blocks.0.attn.k_norm.hook_out") == "blocks.0.attn.k_ln.hook_normalized"
    assert resolve("vision_encoder.encoder_layers.1.hook_out") == "vision.blocks.1.hook_resid_post"
    assert resolve("vision_projector.hook_out") == "adapter.hook_out"
    assert resolve("blocks.2.hook_out") == "blocks.2.hook_resid_post"
    for name in ("blocks.0.attn.hook_out", "blocks.0.mlp.hook_out"):
        with pytest.raises(HookNameError):
            resolve(name)


def test_llava_spec_on_gemma3_is_refused(monkeypatch):
    """LLaVA's pre-norm block without sandwich or q/k norms leaves plain logits exact and hooked
    ones wrong; loading refuses it."""
    import mmlens.model.hooked_mllm as hooked

    hf_model, processor = tiny_gemma3()
    right = hooked.architecture_for(hf_model)

    class WithLlavaBlock(type(right)):
        llm_block = LLM_BLOCK

    monkeypatch.setattr(hooked, "architecture_for", lambda _model: WithLlavaBlock())
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0 \(Gemma3DecoderLayer\) does not match its block spec"):
        HookedMLLM.from_hf(hf_model, processor)


@torch.no_grad()
def test_a_configured_attention_softcap_is_ignored_as_hf_does():
    """transformers' Gemma 3 attention never applies `attn_logit_softcapping`; the hooked maths
    must not either (a cap of 0.5 would move these logits by far more than 1e-5)."""
    hf_model, processor = tiny_gemma3(attn_logit_softcapping=0.5)
    model = HookedMLLM.from_hf(hf_model, processor)
    inputs = model.prepare(random_images(2), ["how many", "what is in the image ?"])
    bare = model(inputs)
    hooked = model.run_with_hooks(inputs, fwd_hooks=[(lambda name: name.endswith("hook_attn_scores"), lambda x, hook: x)])
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(hooked[valid], bare[valid], atol=1e-5, rtol=0)


def test_the_processor_geometry_is_replayed_and_pan_and_scan_refused(eager):
    processor = eager.model.processor
    images = random_images(3)
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(eager.model.geometry.to_pixel_values(images), pixels)
    processor.image_processor.do_pan_and_scan = True
    try:
        with pytest.raises(ValueError, match="Gemma3ImageProcessorPil overrides"):
            ImageGeometry.from_processor(processor)
    finally:
        processor.image_processor.do_pan_and_scan = None


def test_a_window_shorter_than_an_image_is_refused():
    hf_model, processor = tiny_gemma3(tokens_per_side=4, sliding_window=8)  # 16 tokens (3x3 pooling), window 8
    with pytest.raises(UnsupportedModelError, match="sliding_window=8 shorter than an image's 16 tokens"):
        HookedMLLM.from_hf(hf_model, processor)


def test_every_analysis_runs(eager):
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)
    tier.every_analysis_runs(eager.model, scenes)
