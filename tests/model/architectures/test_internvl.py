"""InternVL: tiles chosen by aspect ratio plus a thumbnail, one run of `<IMG_CONTEXT>` between
`<img>` and `</img>`, InternViT blocks (CLS, layer scale parameters, q/k RMSNorm over the whole width
in the 6B towers), 2 x 2 pixel shuffle, and the tile grid known only from each image's size, a
layout-only keyword that never reaches Hugging Face."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import InputError, UnsupportedModelError
from mmlens.model.architectures.internvl import InternVL
from mmlens.model.runtime.attention_masks import additive_mask
from mmlens.testing_families import tiny_internvl

import family_tier as tier
from family_tier import verified_vision_knockout
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

family, eager, builder = tier.fixtures({
    "internvl3": lambda attn: tiny_internvl("internvl3", attn_implementation=attn),
    "internvit6b": lambda attn: tiny_internvl("internvit6b", attn_implementation=attn),
})


def test_tiles_and_thumbnail_follow_the_processor(eager):
    """Each image is the processor's own tile grid (its frame count, and the grid replayed from the
    image's size) then a thumbnail, wrapped in <img> ... </img>; the batch holds several grids."""
    model, inputs = eager.model, eager.inputs
    processor, k = model.processor, model.cfg.adapter.token_grid[0]
    images = tier.random_images(3)
    frames = processor.image_processor(images, crop_to_patches=True)["num_patches"]
    grids = []
    for span, image, n_frames in zip(inputs.layout.spans, images, frames):
        tiles, thumbnail = span.segments
        assert (tiles.kind, thumbnail.kind) == ("tiles", "thumbnail")
        rows, cols = tiles.tokens.rows // k, tiles.tokens.cols // k
        assert rows * cols + 1 == n_frames and span.canvas == (image.height, image.width)
        assert (rows, cols) == model.architecture.tiling.grid((image.height, image.width))
        ids = inputs.input_ids[span.row].cpu()
        assert int(ids[span.special["start"]]) == processor.start_image_token_id
        assert int(ids[span.special["end"]]) == processor.end_image_token_id
        assert int(span.special["end"]) - int(span.special["start"]) == n_frames * k * k + 1
        grids.append((rows, cols))
    assert len(set(grids)) == 3, "the test images are 3 x 2, 2 x 2 and 2 x 3 tiles"
    assert torch.equal(inputs.layout_inputs["image_sizes"].cpu(), torch.tensor([[i.height, i.width] for i in images]))


@torch.no_grad()
def test_pixel_shuffle_addressing(eager):
    """The shuffle reads the last block's patches without CLS, and each token's shuffled features
    are its four patches' (in the layout's patch -> token order), tile by tile and in the thumbnail."""
    model, inputs = eager.model, eager.inputs
    last = f"vision.blocks.{model.cfg.vision.n_layers - 1}.hook_resid_post"
    names = ["adapter.hook_in", "adapter.hook_hidden", last]
    names += ["vision.ln_post.hook_normalized"] if model.cfg.vision.has_ln_post else []
    _, cache = model.run_with_cache(inputs, names_filter=names)
    vision, shuffled = cache["adapter.hook_in"], cache["adapter.hook_hidden"]
    read = cache[names[-1]] if model.cfg.vision.has_ln_post else cache[last]
    assert torch.equal(vision, read[:, 1:]), "the projector reads the tower's output without its CLS token"
    layout, d = inputs.layout, model.cfg.vision.d_model
    assert shuffled.shape[:2] == layout.adapter_shape and vision.shape[0] == layout.vision_shape[0]
    for span in layout.spans:
        for segment in span.segments:
            frame, within = segment.vision_index
            patches = vision[frame, within - 1]  # vision position 0 is the CLS token
            for token in range(len(segment.tokens)):
                fed = patches[segment.patch_to_token == token]
                assert len(fed) == 4
                row = shuffled[tuple(i[token] for i in segment.adapter_index)]
                assert {tuple(x.tolist()) for x in row.view(4, d)} == {tuple(x.tolist()) for x in fed}


@pytest.mark.parametrize("size", [(12, 9), (40, 50), (90, 200), (61, 37)], ids=["upscaled", "wide", "very-wide", "tall"])
def test_patch_boxes_hold_the_pixels_each_patch_saw(eager, size):
    """On an image whose red channel is the column and green the row, every tile and thumbnail
    patch (as the processor resized and cut it) averages the coordinates of its box on the
    original image to within a pixel (measured: 0.5; the box convention of LLaVA-NeXT, the original
    pixel under each edge's centre, is 6 pixels off on the 200 px image)."""
    model = eager.model
    height, width = size
    y, x = np.mgrid[:height, :width]
    picture = Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8))
    inputs = model.prepare([picture], "")
    raw = model.processor.image_processor([picture], crop_to_patches=True, do_rescale=False, do_normalize=False,
                                          return_tensors="pt")["pixel_values"]
    patch = model.cfg.vision.patch_size
    worst = 0.0
    (span,) = inputs.layout.spans
    for segment in span.segments:
        frame, within = segment.vision_index
        seen = raw[frame].float().unflatten(2, (-1, patch)).unflatten(4, (-1, patch)).mean((3, 5))  # [n, 3, g, g]
        g = seen.shape[-1]
        cell = seen[torch.arange(len(frame)), :, (within - 1) // g, (within - 1) % g]  # [n, 3]: mean column, row
        boxes = segment.patches.boxes.float()
        centre_x, centre_y = (boxes[:, 1] + boxes[:, 3]) / 2 - 0.5, (boxes[:, 0] + boxes[:, 2]) / 2 - 0.5
        worst = max(worst, float((cell[:, 0] - centre_x).abs().max()), float((cell[:, 1] - centre_y).abs().max()))
    assert worst <= 1.0, f"a patch's pixels lie {worst:.2f} original pixels from its box"
    assert model.transform_mask(y).shape == span.canvas == size, "masks stay on the original image"


def test_image_as_the_tower_saw_it(eager):
    """An image's picture (recovery maps draw on it) is its own tiles put back in their grid: the
    last image's starts after the earlier images' tiles and thumbnails."""
    model, inputs = eager.model, eager.inputs
    tile, k = model.cfg.vision.image_size, model.cfg.adapter.token_grid[0]
    span = inputs.layout.spans[-1]
    rows, cols = span.segments[0].tokens.rows // k, span.segments[0].tokens.cols // k
    picture = model.architecture.image_pixels(inputs.pixel_values, span.image_index, **inputs.layout_inputs)
    assert picture.shape == (3, rows * tile, cols * tile)
    first = int(span.segments[0].vision_index[0].min())
    assert first == len(inputs.pixel_values) - rows * cols - 1
    for r in range(rows):
        for c in range(cols):
            block = picture[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
            assert torch.equal(block, inputs.pixel_values[first + r * cols + c])
    with pytest.raises(InputError, match="image_sizes"):
        model.architecture.image_pixels(inputs.pixel_values, 0)


@torch.no_grad()
def test_layout_inputs_never_reach_hugging_face(eager):
    """image_sizes travel with the batch (repeats, moves) and into the layout, never into a Hugging
    Face call: not the forward, not the LLM-only shortcut, not generate."""
    model, inputs = eager.model, eager.inputs
    seen = []
    handle = model.hf_model.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    try:
        model(inputs)
        model(inputs.repeat(2))
        with model.using_image_attention("bidirectional"):  # a 4D mask computed from the layout keywords
            model(inputs)
        _, cache = model.run_with_cache(inputs, names_filter="hook_multimodal_embed")
        model(inputs, llm_inputs_embeds=cache["hook_multimodal_embed"])
        model.generate(inputs, max_new_tokens=2)
    finally:
        handle.remove()
    assert len(seen) >= 6 and all("image_sizes" not in keys for keys in seen)
    assert "image_sizes" not in inputs.hf_kwargs() and "image_sizes" in inputs.keywords()
    repeated = inputs.repeat(2)
    assert torch.equal(repeated.layout_inputs["image_sizes"], inputs.layout_inputs["image_sizes"].repeat(2, 1))
    relaid = model.layout(repeated.input_ids, **repeated.layout_inputs)
    assert relaid.same_geometry(repeated.layout)


@torch.no_grad()
def test_unknown_grid_is_refused_with_what_to_do(eager):
    """The processor's own outputs run (the model needs no sizes), but anything needing the layout
    says how to get it; sizes that contradict the frames are refused (sizes giving another grid of
    as many tiles cannot be told apart: that is why the layout needs them)."""
    model, inputs = eager.model, eager.inputs
    processor_outputs = inputs.hf_kwargs()
    torch.testing.assert_close(model(processor_outputs), model(inputs), atol=0, rtol=0)
    with pytest.raises(InputError, match=r"model\.prepare"):
        model.layout(inputs.input_ids)
    _, cache = model.run_with_cache(processor_outputs, names_filter="adapter.hook_out")
    assert cache.layout is None, "a cache of the processor's outputs has no layout (and says so when one is needed)"
    with pytest.raises(InputError, match=r"model\.prepare"), model.using_image_attention("bidirectional"):
        model(processor_outputs)
    squares = torch.full_like(inputs.layout_inputs["image_sizes"], 32)  # 2 x 2 tiles each: fewer frames than given
    with pytest.raises(InputError, match="make 15 frames but pixel_values hold 19"):
        model({**processor_outputs, "image_sizes": squares})


@torch.no_grad()
def test_vision_knockout_equals_hf_with_its_mask(eager):
    """A knockout in InternViT = Hugging Face's own attention given the blocked edges as a mask
    (its blocks pass none; the attention modules take one), frame by frame."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    ko, ours = verified_vision_knockout(model, inputs)
    mask = additive_mask(~ko.blocked.cpu())

    def masked(_module, args, kwargs):
        return args, {**kwargs, "attention_mask": mask}

    handles = [layer.attention.register_forward_pre_hook(masked, with_kwargs=True)
               for layer in reference.model.vision_tower.encoder.layer]
    try:
        theirs = reference(**inputs.hf_kwargs()).logits
    finally:
        for handle in handles:
            handle.remove()
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    assert (ours - model(inputs))[valid].abs().max() > 1e-4, "the knockout changed something"


@pytest.mark.parametrize("wrong", ["no layer scale", "no q/k norm"])
def test_wrong_vision_spec_is_refused(wrong, monkeypatch):
    """A spec that misses InternViT's layer scale or the 6B tower's q/k norms leaves plain logits
    exact; loading refuses it."""
    import mmlens.model.hooked_mllm as hooked

    hf_model, processor = tiny_internvl("internvit6b")

    def spec(vision_config):
        right = InternVL.vision_block(vision_config)
        if wrong == "no layer scale":
            return replace(right, layer_scale=None)
        return replace(right, attention=replace(right.attention, q_norm=None, k_norm=None))

    class Wrong(InternVL):
        vision_block = staticmethod(spec)

    monkeypatch.setattr(hooked, "architecture_for", lambda _model: Wrong())
    with pytest.raises(UnsupportedModelError, match=r"vision\.blocks\.0 .*does not match its block spec"):
        HookedMLLM.from_hf(hf_model, processor)


def test_every_analysis_runs(eager):
    # 48 px scenes: 2 x 2 tiles and the thumbnail each. With seed 0 the 6B-style tower's random-weight
    # ridge probe happens to confuse no pair of classes, which the anchor knockout needs
    scenes = load_segmentation("scenes", split="validation", n=24, seed=1, image_size=48)
    heads = tier.every_analysis_runs(eager.model, scenes)
    tile = eager.model.cfg.vision.image_size
    assert heads.maps[0].image.shape[:2] == (2 * tile, 2 * tile), "recovery maps show the tiles, not one frame"


@torch.no_grad()
def test_llama_llm():
    """InternVL2.5-style checkpoints with a Llama LLM: every hook active equals Hugging Face."""
    hf_model, processor = tiny_internvl(llm="llama")
    reference = copy.deepcopy(hf_model)
    model = HookedMLLM.from_hf(hf_model, processor)
    assert model.hf_model.config.text_config.model_type == "llama" and model.spec_difference < 1e-5
    inputs = model.prepare(tier.random_images(2), ["what", "how many"])
    ours = model.run_with_hooks(inputs, fwd_hooks=[(lambda name: True, lambda x, hook: x.clone())])
    theirs = reference(**inputs.hf_kwargs()).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)


@torch.no_grad()
def test_two_images_in_one_row(eager):
    """A row's two images are two <img> ... </img> runs; their frames follow each other in
    pixel_values, and what the adapter made for each image is what the LLM got at its tokens."""
    model = eager.model
    images = tier.random_images(3)
    token = model.processor.image_token
    inputs = model.prepare([[images[0], images[2]], [images[1]]], [f"{token} and {token} ?", f"{token} what"])
    layout = inputs.layout
    assert [(s.row, s.image_index) for s in layout.spans] == [(0, 0), (0, 1), (1, 2)]
    assert [s.canvas for s in layout.spans] == [(i.height, i.width) for i in (images[0], images[2], images[1])]
    ours = model.run_with_hooks(inputs, fwd_hooks=[(lambda name: True, lambda x, hook: x.clone())])
    theirs = eager.reference(**inputs.hf_kwargs()).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    _, cache = model.run_with_cache(inputs, names_filter=["adapter.hook_out", "hook_multimodal_embed"])
    present = layout.table("llm").present
    assert torch.equal(layout.gather("adapter", cache["adapter.hook_out"])[present],
                       layout.gather("llm", cache["hook_multimodal_embed"])[present])
