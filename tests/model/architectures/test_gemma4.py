"""Gemma 4: its own vision encoder (patchified pixels with padding, 2-D rotary, sandwich norms),
k x k pooling by patch position into a grid per image (aspect ratio kept), a Gemma 4 LLM (v norm,
keys as values, per-layer-type head size and rotary, a scalar on each block's output). The tier
runs on the dense LLM, on one whose full-attention layers reuse their keys as values and on one
whose images attend both ways in the sliding layers (`use_bidirectional_attention="vision"`); what
the hooked blocks cannot compute is refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma4.image_processing_pil_gemma4 import (
    convert_image_to_patches, get_aspect_ratio_preserving_size,
)

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import InputError, UnsupportedModelError
from mmlens.model.architectures.gemma3 import Gemma3
from mmlens.testing.families.gemma4 import SMALLEST_SOFT_TOKEN_BUDGET, tiny_gemma4

import family_tier as tier
from conftest import random_images
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

PROMPTS = ["<|image|> what is in the image ?", "<|image|> how many", "<|image|> the colour of the left shape is ?"]

family, eager, builder = tier.fixtures({
    "dense": lambda attn: tiny_gemma4(attn_implementation=attn),
    "keys_as_values": lambda attn: tiny_gemma4(attn_implementation=attn, attention_k_eq_v=True),
    "vision_bidirectional": lambda attn: tiny_gemma4(attn_implementation=attn, bidirectional_attention="vision"),
})


@pytest.fixture(scope="module")
def gemma4_parts():
    return tiny_gemma4()


@torch.no_grad()
def test_each_image_gets_its_own_soft_tokens_and_hf_runs_on_them(gemma4_parts):
    hf_model, processor = gemma4_parts
    images = random_images(3)
    inputs = processor(images=[[image] for image in images], text=PROMPTS, return_tensors="pt", padding=True)
    vision = hf_model.config.vision_config
    side = vision.patch_size * vision.pooling_kernel_size
    expected = []
    for image in images:
        height, width = get_aspect_ratio_preserving_size(
            image.height, image.width, vision.patch_size, SMALLEST_SOFT_TOKEN_BUDGET * vision.pooling_kernel_size**2,
            vision.pooling_kernel_size,
        )
        expected.append((height // side) * (width // side))
    ids = inputs["input_ids"]
    placeholders = ids == hf_model.config.image_token_id
    assert placeholders.sum(dim=1).tolist() == expected and len(set(expected)) == 3, "three sizes, three token counts"
    assert inputs["attention_mask"].min() == 0, "the batch is padded"
    assert torch.equal(inputs["mm_token_type_ids"] == 1, placeholders)
    features = hf_model.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"]).pooler_output
    assert [len(f) for f in features] == expected
    assert torch.isfinite(hf_model(**inputs).logits).all()


def test_layout_grids_follow_each_image_and_its_geometry(eager):
    model, inputs = eager.model, eager.inputs
    geometry, layout = model.geometry, inputs.layout
    k = model.hf_model.config.vision_config.pooling_kernel_size
    for span, image in zip(layout.spans, random_images(3)):
        (segment,) = span.segments
        assert span.canvas == geometry.output_size(image.height, image.width)
        assert segment.patches.shape == (segment.tokens.shape[0] * k, segment.tokens.shape[1] * k)
        assert torch.equal(torch.bincount(segment.patch_to_token), torch.full((len(segment.tokens),), k * k))
        ids = inputs.input_ids[span.row].cpu()
        assert int(ids[span.special["start"]]) == model.hf_model.config.boi_token_id
        assert int(ids[span.special["end"]]) == model.hf_model.config.eoi_token_id
    assert len({span.canvas for span in layout.spans}) == 3 and not layout.uniform


def test_image_pixels_are_the_patches_put_back(eager):
    model, inputs = eager.model, eager.inputs
    patch = model.hf_model.config.vision_config.patch_size
    for span in inputs.layout.spans:
        picture = model.architecture.image_pixels(inputs.pixel_values, span.image_index, **inputs.extra)
        assert tuple(picture.shape) == (3, *span.canvas)
        patches = torch.from_numpy(convert_image_to_patches(picture.numpy(), patch))
        assert torch.equal(patches, inputs.pixel_values[span.image_index, : len(patches)])


@torch.no_grad()
def test_adapter_input_is_the_last_block_pooled_by_position(eager):
    model, inputs = eager.model, eager.inputs
    last = f"vision.blocks.{model.cfg.vision.n_layers - 1}.hook_resid_post"
    _, cache = model.run_with_cache(inputs, names_filter=[last, "adapter.hook_in", "adapter.hook_hidden"])
    layout, d_vision = inputs.layout, model.cfg.vision.d_model
    patches, pooled = layout.gather("vision", cache[last]), layout.gather("adapter", cache["adapter.hook_in"])
    for k, span in enumerate(layout.spans):
        to_token = span.segments[0].patch_to_token
        n = len(span.segments[0].tokens)
        mean = torch.zeros(n, d_vision).index_add_(0, to_token, patches[k, : len(to_token)]) / torch.bincount(to_token)[:, None]
        torch.testing.assert_close(pooled[k, :n], mean * d_vision**0.5, atol=1e-5, rtol=1e-5)
    embedder = eager.reference.model.embed_vision
    torch.testing.assert_close(cache["adapter.hook_hidden"], embedder.embedding_pre_projection_norm(cache["adapter.hook_in"]))


@torch.no_grad()
def test_layer_scalar_scales_the_whole_block_output(eager):
    model, inputs = eager.model, eager.inputs
    names = [f"blocks.0.hook_{p}" for p in ("resid_mid", "mlp_out", "resid_post")]
    _, cache = model.run_with_cache(inputs, names_filter=names)
    scalar = model.hf_model.model.language_model.layers[0].layer_scalar
    assert (scalar - 1).abs().item() > 0.05
    torch.testing.assert_close(cache[names[2]], (cache[names[0]] + cache[names[1]]) * scalar)


@torch.no_grad()
@pytest.mark.parametrize("eager", ["vision_bidirectional"], indirect=True)
def test_vision_checkpoints_open_images_in_the_sliding_layers_only(eager):
    """A "vision" checkpoint's own mode is "bidirectional": Hugging Face's own forward equals the
    per-layer-type masks of its edges (full layers causal), and not Gemma 3's rule, which would open
    the full layers too; the default bidirectional edit opens the sliding layers only."""
    model, inputs = eager.model, eager.inputs
    assert model.image_attention == "bidirectional"
    edges = model.attention_edges(inputs)
    causal = torch.ones(edges.shape[-1], edges.shape[-1], dtype=torch.bool).tril()
    assert (edges & ~causal).any(), "image tokens see later image tokens"
    masks = model.architecture.hf_attention_mask(edges)
    assert torch.equal(masks["full_attention"][:, 0] == 0, edges & causal)
    plain = {k: v for k, v in inputs.hf_kwargs().items() if k not in ("attention_mask", "mm_token_type_ids")}
    ours, valid = model(inputs), inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], eager.reference(**plain, attention_mask=masks).logits[valid], atol=1e-5, rtol=0)
    everywhere = eager.reference(**plain, attention_mask=Gemma3.hf_attention_mask(model.architecture, edges)).logits
    assert (everywhere - ours)[valid].abs().max() > 1e-4, "opening the full layers too is another model"
    types = model.hf_model.config.text_config.layer_types
    assert model.architecture.image_attention_layers(model.cfg) == tuple(
        l for l, kind in enumerate(types) if kind == "sliding_attention") != tuple(range(len(types)))


@torch.no_grad()
@pytest.mark.parametrize("eager", ["vision_bidirectional"], indirect=True)
def test_decoding_step_by_step_keeps_generated_tokens_as_text(eager):
    """Without Hugging Face's cache each step re-runs the whole rows, whose `mm_token_type_ids`
    grow by a text token each; the answers are Hugging Face's own cached decoding's."""
    model, inputs = eager.model, eager.inputs
    ours = model.generate(inputs, max_new_tokens=3, use_past_kv_cache=False)
    theirs = eager.reference.generate(**inputs.hf_kwargs(), max_new_tokens=3, do_sample=False)
    assert ours == model.processor.batch_decode(theirs[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def test_keys_are_the_values_where_v_proj_is_absent():
    model = HookedMLLM.from_hf(*tiny_gemma4(attention_k_eq_v=True))
    inputs = model.prepare(random_images(2), "what")
    full = [l for l, kind in enumerate(model.hf_model.config.text_config.layer_types) if kind == "full_attention"]
    assert full and all(model.hf_model.model.language_model.layers[l].self_attn.v_proj is None for l in full)
    names = [f"blocks.{full[0]}.attn.hook_{p}" for p in ("k", "v", "q")]
    _, cache = model.run_with_cache(inputs, names_filter=names)
    assert torch.equal(cache[names[0]], cache[names[1]])
    assert cache[names[2]].shape[-1] == model.hf_model.config.text_config.per_layer_config[full[0]].head_dim != model.cfg.d_head
    torch.testing.assert_close(model.blocks[full[0]].attn.W_V, model.blocks[full[0]].attn.W_K)


@pytest.mark.parametrize("field, value", [("use_bidirectional_attention", "all")])  # E2B/E4B, 26B-A4B: own files
def test_unsupported_checkpoints_are_refused_by_their_config_field(gemma4_parts, field, value):
    hf_model, processor = tiny_gemma4()
    setattr(hf_model.config.text_config, field, value)
    with pytest.raises(UnsupportedModelError, match=f"text_config.{field}={value!r} is not supported"):
        HookedMLLM.from_hf(hf_model, processor)


def test_clipped_tower_linears_are_refused():
    hf_model, processor = tiny_gemma4()
    clipped = hf_model.model.vision_tower.encoder.layers[0].self_attn.o_proj
    clipped.use_clipped_linears, clipped.output_max = True, torch.tensor(1.0)
    with pytest.raises(UnsupportedModelError, match="clips encoder.layers.0.self_attn.o_proj"):
        HookedMLLM.from_hf(hf_model, processor)


def test_images_longer_than_the_sliding_window_are_refused():
    model = HookedMLLM.from_hf(*tiny_gemma4(sliding_window=40))
    with pytest.raises(InputError, match="longer than Gemma 4's sliding_window=40"):
        model(model.prepare(random_images(1), "what"))


@pytest.mark.parametrize("eager", ["dense"], indirect=True)  # the studies' plumbing, once
def test_every_analysis_runs(eager):
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)
    heads = tier.every_analysis_runs(eager.model, scenes)
    shown = heads.maps[0]  # the scene as the model saw it: resized to its own aspect-preserving grid
    assert shown.image.shape[:2] == eager.model.geometry.output_size(32, 32)


BRIDGE_NAMES = {
    "vision_encoder.hook_out": "adapter.hook_in",
    "vision_projector.hook_out": "adapter.hook_out",
    "embed.hook_out": "hook_embed",
    "blocks.1.hook_out": "blocks.1.hook_resid_post",
    "blocks.0.ln1_post.hook_out": "blocks.0.ln1_post.hook_normalized",
    "blocks.2.attn.q_norm.hook_out": "blocks.2.attn.q_ln.hook_normalized",
    "blocks.0.mlp.gate.hook_out": "blocks.0.mlp.hook_pre",
}


def test_bridge_hook_names_are_aliases(eager):
    """TransformerBridge wraps Gemma 4's LLM as Gemma 3's and its tower and embedder as two parts."""
    tier.assert_bridge_aliases(eager.model, eager.inputs, BRIDGE_NAMES)
