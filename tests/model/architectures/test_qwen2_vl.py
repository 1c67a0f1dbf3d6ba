"""Qwen2-VL: native resolution (a grid per image), a packed vision tower split by cu_seqlens, the
2x2 patch merger and M-RoPE. The Qwen-specific tests here also run on Qwen2.5-VL
(`test_qwen2_5_vl.py` imports `QWEN_TESTS`)."""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from mmlens import HookedMLLM
from mmlens.errors import UnsupportedModelError
from mmlens.data import load_segmentation
from mmlens.model.architectures import architecture_for
from mmlens.model.architectures.qwen2_vl.tower import block_diagonal
from mmlens.testing_families import tiny_qwen2_vl
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

import family_tier as tier
from conftest import random_images
from family_tier import verified_vision_knockout
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

family, eager, builder = tier.fixtures({"qwen2-vl": lambda attn: tiny_qwen2_vl("2", attn_implementation=attn)})


@torch.no_grad()
def test_cache_equals_hf_hidden_states(eager):
    """LLM residuals = HF hidden states, vision residuals = the tower's (packed, its order), the
    adapter's output = HF's merged image features (LLM token order)."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    _, cache = model.run_with_cache(inputs)
    ref = reference(**inputs.hf_kwargs(), output_hidden_states=True)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], ref.hidden_states[layer], atol=1e-5, rtol=0)
    grid = inputs.extra["image_grid_thw"]
    tower = reference.model.visual(inputs.pixel_values, grid_thw=grid, output_hidden_states=True)
    for block in range(model.cfg.vision.n_layers):
        torch.testing.assert_close(cache[f"vision.blocks.{block}.hook_resid_post"][0], tower.hidden_states[block + 1],
                                   atol=1e-5, rtol=0)
    features = torch.cat(reference.model.get_image_features(inputs.pixel_values, grid).pooler_output)
    torch.testing.assert_close(cache["adapter.hook_out"][0], features, atol=1e-5, rtol=0)


@contextmanager
def tower_attention_masked(reference, allowed: torch.Tensor):
    """Hugging Face's own vision attention, run chunk by chunk as it does, with the additive mask
    of `allowed` ([n_patches, n_patches], packed order) cut to each chunk."""
    visual = reference.model.visual
    vision_attention = type(visual.blocks[0].attn)
    module = sys.modules[vision_attention.__module__]
    original = module.eager_attention_forward  # the LLM's attention uses it too: leave that alone
    offset = [0]

    def masked(attn, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        if not isinstance(attn, vision_attention):
            return original(attn, query, key, value, attention_mask, scaling, dropout, **kwargs)
        n = query.shape[2]
        start, offset[0] = offset[0], offset[0] + n
        block = allowed[start : start + n, start : start + n]
        mask = torch.zeros(block.shape).masked_fill(~block, float("-inf"))[None, None]
        return original(attn, query, key, value, mask, scaling, dropout, **kwargs)

    handles = [block.attn.register_forward_pre_hook(lambda *_: offset.__setitem__(0, 0)) for block in visual.blocks]
    module.eager_attention_forward = masked
    try:
        yield
    finally:
        module.eager_attention_forward = original
        for handle in handles:
            handle.remove()


@torch.no_grad()
def test_vision_knockout_equals_hf_with_its_mask(eager):
    """A knockout in the packed tower = Hugging Face's per-image (per-window) attention with the
    blocked edges masked, chunk by chunk."""
    model, inputs = eager.model, eager.inputs
    ko, ours = verified_vision_knockout(model, inputs)
    with tower_attention_masked(eager.reference, ~ko.blocked[0].cpu()):
        theirs = eager.reference(**inputs.hf_kwargs()).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    assert (ours - model(inputs))[valid].abs().max() > 1e-4, "the knockout changed something"
    # the mask it reports is the packed tower's own: one block per image, minus the blocked edges
    images = block_diagonal(get_vision_cu_seqlens(inputs.extra["image_grid_thw"].cpu()), ko.blocked.shape[-1])
    assert torch.equal(ko.effective_mask()[0].cpu(), images & ~ko.blocked[0].cpu())


@torch.no_grad()
def test_vision_attention_stays_in_its_image_and_window(eager):
    """The packed pattern is zero between images, and in Qwen2.5-VL's windowed blocks between
    windows; the full blocks read the whole image."""
    model, inputs = eager.model, eager.inputs
    _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.startswith("vision.") and n.endswith("hook_pattern"))
    visual = model.hf_model.model.visual
    grid = inputs.extra["image_grid_thw"].cpu()
    n = int(grid.prod(-1).sum())
    images = block_diagonal(get_vision_cu_seqlens(grid), n)
    windowed = getattr(visual, "fullatt_block_indexes", None)
    for block in range(model.cfg.vision.n_layers):
        pattern = cache[f"vision.blocks.{block}.attn.hook_pattern"][0].cpu()
        assert pattern.shape == (model.cfg.vision.n_heads, n, n)
        rule = images
        if windowed is not None and block not in windowed:
            _, cu_windows = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)
            rule = block_diagonal(cu_windows, n)
            assert rule.sum() < images.sum(), "the test images span several windows"
        assert (pattern[:, ~rule] == 0).all() and (pattern[:, rule] > 0).all()


@pytest.mark.parametrize("site", ["hook_attn_scores", "hook_pattern"])
def test_tower_attention_edits_count_in_place_or_returned(eager, site):
    """The tower attends image by image and builds the packed matrices only for listeners: an edit
    made in place (the hook returns None) must count exactly like the same edit returned, and both
    must change the output, or a knockout written in TransformerLens's in-place style would be lost."""
    model, inputs = eager.model, eager.inputs
    name = f"vision.blocks.1.attn.{site}"

    def edit(x):  # head 0 of every query reads the last patch of the packed sequence only
        x[:, 0] = x[:, 0].min() if site == "hook_attn_scores" else 0.0
        x[:, 0, :, -1] = x.max() if site == "hook_attn_scores" else 1.0

    def in_place(x, hook):
        edit(x)

    def through_data(x, hook):  # no version counter sees this one
        edit(x.data)

    def returned(x, hook):
        x = x.clone()
        edit(x)
        return x

    with torch.no_grad():
        base = model(inputs)
        a, b, c = (model.run_with_hooks(inputs, fwd_hooks=[(name, hook)]) for hook in (in_place, through_data, returned))
    assert torch.equal(a, c) and torch.equal(b, c)
    assert (a - base).abs().max() > 1e-4

    # a hook that only reads still receives the loss's gradient: the rest of the forward is computed from
    # the matrix it saw, not from the per-image blocks
    seen = {}

    def keep(x, hook):
        x.retain_grad()
        seen["x"] = x

    model.run_with_hooks(inputs, fwd_hooks=[(name, keep)]).sum().backward()
    model.zero_grad(set_to_none=True)
    assert seen["x"].grad is not None and seen["x"].grad.abs().sum() > 0


def test_each_image_has_its_own_grid_and_mrope_cells(eager):
    """Grids follow image_grid_thw (two sizes in the batch), start/end tokens sit outside them, and
    the M-RoPE rows and columns of an image's tokens are its grid cells."""
    model, inputs = eager.model, eager.inputs
    layout = inputs.layout
    grid = inputs.extra["image_grid_thw"].cpu()
    shapes = {tuple(span.segments[0].tokens.shape) for span in layout.spans}
    assert len(shapes) > 1, "images of different sizes"
    positions = model.architecture.position_ids(inputs.hf_kwargs()).cpu()
    ids = inputs.input_ids.cpu()
    config = model.hf_model.config
    for span in layout.spans:
        (segment,) = span.segments
        _, h, w = grid[span.image_index].tolist()
        assert segment.tokens.shape == (h // 2, w // 2) and span.canvas == (h * 4, w * 4)
        assert int(ids[span.row, span.special["start"]]) == config.vision_start_token_id
        assert int(ids[span.row, span.special["end"]]) == config.vision_end_token_id
        t, row, col = positions[:, span.row, segment.positions]
        assert (t == t[0]).all()
        assert torch.equal(torch.stack([row - row[0], col - col[0]], dim=1), segment.tokens.cells)


@torch.no_grad()
def test_vision_gather_reads_raster_patches(eager):
    """`gather("vision")` puts each image's patches in raster order: the patch embeddings it returns
    are the patch embedding of the processed image's pixels at those cells."""
    model, inputs = eager.model, eager.inputs
    _, cache = model.run_with_cache(inputs, names_filter="vision.hook_embed")
    gathered = inputs.layout.gather("vision", cache["vision.hook_embed"])
    embed = model.hf_model.model.visual.patch_embed
    offset = 0
    for k, span in enumerate(inputs.layout.spans):
        _, h, w = inputs.extra["image_grid_thw"][span.image_index].tolist()
        own = embed(inputs.pixel_values[offset : offset + h * w])  # the processor's order: 2x2 groups
        offset += h * w
        r, c = span.segments[0].patches.cells.T
        slot = ((r // 2) * (w // 2) + c // 2) * 4 + (r % 2) * 2 + c % 2
        torch.testing.assert_close(gathered[k, : h * w], own[slot], atol=1e-6, rtol=0)


def test_layout_contract(eager):
    """The tier's contract, and Qwen's own: `<|vision_start|>` / `<|vision_end|>` are the only
    specials (not placeholders), each image is one segment whose tokens are each fed by their 2x2
    patches, and what the merger made is what the LLM got."""
    tier.test_layout_contract(eager)
    model, inputs = eager.model, eager.inputs
    layout = inputs.layout
    placeholders = inputs.input_ids.cpu() == model.cfg.image_token_id
    for span in layout.spans:
        assert set(span.special) == {"start", "end"} and not placeholders[span.row, span.special["start"]].any()
        (segment,) = span.segments
        assert torch.equal(torch.bincount(segment.patch_to_token), torch.full((len(segment.tokens),), 4))
        token_box = segment.tokens.boxes[segment.patch_to_token]
        patch_box = segment.patches.boxes
        assert ((patch_box[:, :2] >= token_box[:, :2]) & (patch_box[:, 2:] <= token_box[:, 2:])).all()
    _, cache = model.run_with_cache(inputs, names_filter=["adapter.hook_out", "hook_multimodal_embed"])
    present = layout.table("llm").present
    assert present.sum(1).tolist() == [len(s.positions) for s in layout.spans]
    torch.testing.assert_close(layout.gather("adapter", cache["adapter.hook_out"])[present],
                               layout.gather("llm", cache["hook_multimodal_embed"])[present], atol=0, rtol=0)


def test_masks_follow_the_resize_onto_each_canvas(eager):
    """`transform_mask` resizes a mask as the processor resizes its image (smart_resize, nearest):
    it lands on the canvas; the geometry's image is the processor's resize, and `image_pixels`
    reads that picture back out of the packed patches."""
    model, inputs = eager.model, eager.inputs
    images = random_images(3)
    processor = model.processor.image_processor
    for span, image in zip(inputs.layout.spans, images):
        mask = np.zeros((image.height, image.width), dtype=np.uint8)
        assert model.transform_mask(mask).shape == span.canvas
        ours = np.asarray(model.geometry.transform_image(image), dtype=np.float32) / 255
        theirs = processor.resize(np.asarray(image).transpose(2, 0, 1), size=processor.size, resample=processor.resample,
                                  factor=processor.patch_size * processor.merge_size)
        np.testing.assert_allclose(ours.transpose(2, 0, 1), np.asarray(theirs, dtype=np.float32) / 255, atol=1 / 255)
        # and the packed pixel_values hold that picture, normalised
        picture = model.architecture.image_pixels(inputs.pixel_values, span.image_index, **inputs.extra).cpu()
        mean, std = (torch.tensor(v)[:, None, None] for v in (processor.image_mean, processor.image_std))
        expected = (torch.from_numpy(ours.transpose(2, 0, 1).copy()) - mean) / std
        torch.testing.assert_close(picture, expected, atol=1.01 / 255 / min(processor.image_std), rtol=0)


def test_a_tower_spec_without_its_rotary_is_refused(builder, monkeypatch):
    hf_model, processor = builder()
    monkeypatch.setattr(type(architecture_for(hf_model)), "vision_rotary", False)
    with pytest.raises(UnsupportedModelError, match=r"vision\.blocks\.0 .*does not match its block spec"):
        HookedMLLM.from_hf(hf_model, processor)


@torch.no_grad()
def test_vision_weights_split_the_fused_qkv(eager):
    """`W_Q/W_K/W_V` of a vision block are per-head views of its fused qkv: they give the cached
    queries, keys and values from the block's normalised input."""
    model, inputs = eager.model, eager.inputs
    names = ["vision.blocks.0.ln1.hook_normalized", *(f"vision.blocks.0.attn.hook_{x}" for x in "qkv")]
    _, cache = model.run_with_cache(inputs, names_filter=names)
    attn = model.vision.blocks[0].attn
    cfg = model.cfg.vision
    assert attn.W_Q.shape == (cfg.n_heads, cfg.d_model, cfg.d_head)
    normed = cache["vision.blocks.0.ln1.hook_normalized"]
    for x, (w, b) in zip("qkv", ((attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V))):
        ours = torch.einsum("bpm,hmd->bphd", normed, w) + b
        torch.testing.assert_close(ours, cache[f"vision.blocks.0.attn.hook_{x}"], atol=1e-5, rtol=0)
    assert attn.W_Q.data_ptr() == model.hf_model.model.visual.blocks[0].attn.qkv.weight.data_ptr()  # a view


@torch.no_grad()
def test_two_images_in_one_row(builder):
    """A prompt with two images of different sizes: two spans in its row, each with its own grid,
    and every hook active still gives Hugging Face's logits."""
    hf_model, processor = builder()
    reference = copy.deepcopy(hf_model)
    model = HookedMLLM.from_hf(hf_model, processor)
    a, b, c = random_images(3)
    inputs = model.prepare([[a, b], [c]], ["compare them", "what"])
    rows = [[span.image_index for span in row] for row in inputs.layout.images]
    assert rows == [[0, 1], [2]]
    first, second = inputs.layout.images[0]
    assert first.segments[0].tokens.shape != second.segments[0].tokens.shape
    assert int(first.special["end"]) < int(second.special["start"])
    ours = model.run_with_hooks(inputs, fwd_hooks=[(lambda name: True, lambda x, hook: x.clone())])
    valid = inputs.attention_mask.bool()
    theirs = reference(**inputs.hf_kwargs()).logits
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)


def test_every_analysis_runs(eager):
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)
    heads = tier.every_analysis_runs(eager.model, scenes)
    shown = heads.maps[0]  # a 32x32 scene is not resized: the recovery map shows it as it is
    original = np.asarray(scenes[shown.dataset_index]["image"], dtype=np.int64)
    assert shown.image.shape == original.shape and np.abs(shown.image - original).max() <= 1


QWEN_TESTS = (
    test_tower_attention_edits_count_in_place_or_returned,
    test_layout_contract,
    test_masks_follow_the_resize_onto_each_canvas,
    test_a_tower_spec_without_its_rotary_is_refused,
    test_cache_equals_hf_hidden_states,
    test_vision_knockout_equals_hf_with_its_mask,
    test_vision_attention_stays_in_its_image_and_window,
    test_each_image_has_its_own_grid_and_mrope_cells,
    test_vision_gather_reads_raster_patches,
    test_vision_weights_split_the_fused_qkv,
    test_two_images_in_one_row,
    test_every_analysis_runs,
)
