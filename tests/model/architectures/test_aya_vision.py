"""Aya Vision: GotOcr2 tiles plus a thumbnail, each tile's run of `<|IMG_PATCH|>` after its own
`TILE_i` marker text, a SigLIP tower, pixel shuffle + LayerNorm + SwiGLU, and a Cohere2 LLM of
parallel blocks (x + attn(ln(x)) + mlp(ln(x))) whose sliding-window layers alone are rotary."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import HookNameError, InputError, LayoutMismatchError, UnsupportedModelError
from mmlens.model.architectures.aya_vision import AyaVision
from mmlens.testing.families.aya_vision import tiny_aya_vision

import family_tier as tier
from family_tier import assert_bridge_aliases
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

family, eager, builder = tier.fixtures({"aya_vision": lambda attn: tiny_aya_vision(attn_implementation=attn)})


def test_tiles_thumbnail_and_tile_tags_follow_the_processor(eager):
    """Each image is the processor's own tile grid then a thumbnail, every run after its marker text
    (`TILE_i` split into several tokens, `TILE_GLOBAL`), all between the start and end markers."""
    model, inputs = eager.model, eager.inputs
    processor, k = model.processor, model.cfg.adapter.token_grid[0]
    images = tier.random_images(3)
    frames = processor.image_processor(images, crop_to_patches=True)["num_patches"]
    tokenizer = processor.tokenizer
    grids = []
    for span, image, n_frames in zip(inputs.layout.spans, images, frames):
        tiles, thumbnail = span.segments
        assert (tiles.kind, thumbnail.kind) == ("tiles", "global")
        rows, cols = tiles.tokens.rows // k, tiles.tokens.cols // k
        assert rows * cols + 1 == n_frames and span.canvas == (image.height, image.width)
        ids = inputs.input_ids[span.row].cpu()
        assert tokenizer.convert_ids_to_tokens(int(ids[span.special["start"]])) == "<|START_OF_IMG|>"
        assert tokenizer.convert_ids_to_tokens(int(ids[span.special["end"]])) == "<|END_OF_IMG|>"
        tags = tokenizer.convert_ids_to_tokens(ids[span.special["tile_tag"]].tolist())
        assert tags.count("TILE") == rows * cols and tags[-1] == "TILE_GLOBAL" and len(tags) > n_frames
        inside = int(span.special["end"]) - int(span.special["start"]) - 1
        assert inside == n_frames * k * k + len(tags), "the markers hold the runs and the tags, nothing else"
        grids.append((rows, cols))
    assert len(set(grids)) == 3, "the test images are 3 x 2, 2 x 2 and 2 x 3 tiles"


@torch.no_grad()
def test_parallel_blocks_have_no_middle_residual(eager):
    """A parallel block adds attention and MLP of the same normalised input to its residual: no
    hook_resid_mid, no ln2 (unknown names, as in TL's parallel blocks), the MLP reads ln1's output,
    and resid_post is resid_pre + attn_out + mlp_out, bit for bit."""
    model, inputs = eager.model, eager.inputs
    for name in ("blocks.0.hook_resid_mid", "blocks.1.ln2.hook_normalized"):
        with pytest.raises(HookNameError):
            model.resolve_hook_name(name)
    assert model.cfg.parallel_attn_mlp
    _, cache = model.run_with_cache(inputs)
    mlp = model.hf_model.model.language_model.layers[1].mlp
    for layer in range(model.cfg.n_layers):
        block = f"blocks.{layer}."
        summed = cache[block + "hook_resid_pre"] + cache[block + "hook_attn_out"] + cache[block + "hook_mlp_out"]
        assert torch.equal(summed, cache[block + "hook_resid_post"])
    assert torch.equal(cache["blocks.1.mlp.hook_pre"], mlp.gate_proj(cache["blocks.1.ln1.hook_normalized"]))


def test_a_sequential_block_spec_is_refused(builder, monkeypatch):
    """The block read as sequential (`x + attn(ln(x))`, then `+ mlp(ln(.))` of that sum) gives plain
    logits exactly and wrong activations; loading refuses it."""
    import mmlens.model.hooked_mllm as hooked

    hf_model, processor = builder()
    right = hooked.architecture_for(hf_model)

    class Sequential(type(right)):
        llm_block = replace(right.llm_block, parallel_attention_mlp=False)

    monkeypatch.setattr(hooked, "architecture_for", lambda _model: Sequential())
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0 .*does not match its block spec"):
        HookedMLLM.from_hf(hf_model, processor)


@torch.no_grad()
def test_decompositions_sum_to_the_residual_of_parallel_blocks(eager):
    """The residual a parallel block's MLP reads is its attention's (resid_pre, through ln1), so
    `mlp_input=True` decomposes and normalises that; every decomposition sums to the cached residual."""
    model, inputs = eager.model, eager.inputs
    _, cache = model.run_with_cache(inputs)
    valid = inputs.attention_mask.bool()
    for layer in range(model.cfg.n_layers + 1):
        target = cache[f"blocks.{layer}.hook_resid_pre"] if layer < model.cfg.n_layers else \
            cache[f"blocks.{layer - 1}.hook_resid_post"]
        for mlp_input in (False, True) if layer < model.cfg.n_layers else (False,):
            parts = cache.decompose_resid(layer, mlp_input=mlp_input)
            torch.testing.assert_close(parts.sum(0)[valid], target[valid], atol=1e-4, rtol=0)
            full = cache.get_full_resid_decomposition(layer, mlp_input=mlp_input, expand_neurons=True)
            torch.testing.assert_close(full.sum(0)[valid], target[valid], atol=1e-4, rtol=0)
    normalised = cache.apply_ln_to_stack(cache["blocks.1.hook_resid_pre"][None], 1, mlp_input=True)[0]
    torch.testing.assert_close(normalised[valid], cache["blocks.1.ln1.hook_normalized"][valid], atol=1e-4, rtol=0)
    assert torch.equal(cache.accumulated_resid(1, mlp_input=True)[-1], cache["blocks.1.hook_resid_pre"])
    with pytest.raises(HookNameError, match="parallel"):
        cache.accumulated_resid(incl_mid=True)


@torch.no_grad()
def test_rotary_only_on_sliding_layers_and_their_window(eager):
    """Layer 0 slides (rotated queries and keys, keys `sliding_window` or more back masked); layer 1
    attends fully without positions (its rotated query is its query)."""
    model, inputs = eager.model, eager.inputs
    names = [f"blocks.{l}.attn.hook_{p}" for l in (0, 1) for p in ("q", "rot_q", "pattern")]
    _, cache = model.run_with_cache(inputs, names_filter=names)
    assert torch.equal(cache["blocks.1.attn.hook_rot_q"], cache["blocks.1.attn.hook_q"])
    assert not torch.equal(cache["blocks.0.attn.hook_rot_q"], cache["blocks.0.attn.hook_q"])
    window = model.architecture.sliding_window
    seq = inputs.input_ids.shape[1]
    assert window < seq
    position = torch.arange(seq)
    too_far = (position[None, :] <= position[:, None] - window) & inputs.attention_mask.cpu().bool()[:, :, None]
    sliding, full = (cache[f"blocks.{l}.attn.hook_pattern"].cpu().transpose(0, 1) for l in (0, 1))  # head first
    assert (sliding[:, too_far] == 0).all() and (full[:, too_far] > 0).any()


# what the projector reads: vision_feature_layer -1, the last block's output before post_layernorm
PROJECTOR_READS = "vision.blocks.1.hook_resid_post"


@torch.no_grad()
def test_pixel_shuffle_addressing(eager, request):
    """The projector reads every patch of its tower state (SigLIP has no CLS token), and each
    token's shuffled features are its four patches' (in the layout's patch -> token order)."""
    model, inputs = eager.model, eager.inputs
    reads = request.module.PROJECTOR_READS
    _, cache = model.run_with_cache(inputs, names_filter=["adapter.hook_in", "adapter.hook_hidden", reads])
    vision, shuffled = cache["adapter.hook_in"], cache["adapter.hook_hidden"]
    assert torch.equal(vision, cache[reads])
    layout, d = inputs.layout, model.cfg.vision.d_model
    assert shuffled.shape[:2] == layout.adapter_shape and vision.shape[:2] == layout.vision_shape
    for span in layout.spans:
        for segment in span.segments:
            frame, within = segment.vision_index
            patches = vision[frame, within]
            for token in range(len(segment.tokens)):
                fed = patches[segment.patch_to_token == token]
                assert len(fed) == 4
                row = shuffled[tuple(i[token] for i in segment.adapter_index)]
                assert {tuple(x.tolist()) for x in row.view(4, d)} == {tuple(x.tolist()) for x in fed}


@torch.no_grad()
def test_vision_knockout_equals_hf_with_its_mask(eager, monkeypatch):
    """A knockout in the tower = Hugging Face's SigLIP attention given the blocked edges as its mask."""
    import transformers.models.siglip.modeling_siglip as hf

    tier.assert_vision_knockout_equals_hf_attention(eager, monkeypatch, hf, "eager_attention_forward")


BRIDGE_NAMES = {
    "blocks.0.hook_in": "blocks.0.hook_resid_pre",
    "blocks.1.ln1.hook_out": "blocks.1.ln1.hook_normalized",
    "blocks.0.attn.hook_out": "blocks.0.hook_attn_out",
    "blocks.1.mlp.hook_out": "blocks.1.hook_mlp_out",
    "blocks.1.mlp.gate.hook_out": "blocks.1.mlp.hook_pre",
}


def test_bridge_hook_names_are_aliases(eager):
    """TransformerBridge's Cohere2 names (TL 4.3's ParallelBlockBridge) resolve to ours; its blocks
    have no ln2, and neither name resolves here."""
    assert_bridge_aliases(eager.model, eager.inputs, BRIDGE_NAMES)
    with pytest.raises(HookNameError):
        eager.model.resolve_hook_name("blocks.0.ln2.hook_out")


def test_every_analysis_runs(eager):
    # 48 px scenes: 3 x 3 tiles of 16 px and the thumbnail each
    scenes = load_segmentation("scenes", split="validation", n=24, seed=1, image_size=48)
    heads = tier.every_analysis_runs(eager.model, scenes)
    tile = eager.model.cfg.vision.image_size
    assert heads.maps[0].image.shape[0] >= 2 * tile, "recovery maps show the tiles, not one frame"


def test_inputs_that_do_not_match_are_refused(eager):
    model, inputs = eager.model, eager.inputs
    with pytest.raises(InputError, match="image_sizes"):
        model.architecture.layout(model.cfg, inputs.input_ids)
    small = torch.full((3, 2), 16)  # one tile each, where the prompts hold several tiles and a thumbnail
    with pytest.raises(LayoutMismatchError, match="1 x 1 tiles"):
        model.architecture.layout(model.cfg, inputs.input_ids, image_sizes=small)
    with pytest.raises(InputError, match="frames"):
        model.architecture.check_inputs(model.cfg, inputs.input_ids, inputs.pixel_values[1:], **inputs.layout_inputs)


@pytest.mark.parametrize("field, value, named", [
    ("vision_feature_select_strategy", "default", "CLS"),
    ("vision_feature_layer", [-1, -2], "single layer"),
])
def test_unsupported_configs_are_refused_by_name(builder, field, value, named):
    hf_model, processor = builder()
    setattr(hf_model.config, field, value)
    with pytest.raises(UnsupportedModelError, match=named):
        AyaVision().build_config(hf_model)
