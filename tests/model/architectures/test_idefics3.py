"""Idefics3 and SmolVLM: tiles plus a global image, each run of image tokens wrapped in text
separators, 2x2 pixel shuffle (four patches per LLM token), padding frames dropped by the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import InputError
from mmlens.testing_families import tiny_idefics3

import family_tier as tier
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

family, eager, builder = tier.fixtures({
    "idefics3": lambda attn: tiny_idefics3("idefics3", attn_implementation=attn),
    "smolvlm": lambda attn: tiny_idefics3("smolvlm", attn_implementation=attn),
})


def test_separators_and_frames_follow_the_processor(eager):
    """Each image: its tile tags, one separator before every frame plus the closing one, the global
    tag; the tile grid is the processor's rows x cols, and images of different sizes differ in it."""
    model, inputs = eager.model, eager.inputs
    processor, tile = model.processor, model.cfg.vision.image_size
    grids = []
    for span in inputs.layout.spans:
        kinds = [s.kind for s in span.segments]
        tiles = span.segments[0].tokens.shape if kinds == ["tiles", "global"] else (0, 0)
        k = model.cfg.adapter.token_grid[0]
        n_tiles = (tiles[0] // k) * (tiles[1] // k)
        assert len(span.special["tile_tag"]) == n_tiles and len(span.special["global_tag"]) == 1
        assert len(span.special["separator"]) == n_tiles + 2
        assert span.canvas == ((tiles[0] // k) * tile, (tiles[1] // k) * tile)
        ids = inputs.input_ids[span.row]
        assert (ids[span.special["separator"]] == processor.fake_image_token_id).all()
        assert (ids[span.special["global_tag"]] == processor.global_image_token_id).all()
        grids.append(tiles)
    assert len(set(grids)) > 1, "the batch must hold images with different tile grids"


@torch.no_grad()
def test_pixel_shuffle_addressing(eager):
    """Four patches feed each token: the connector's shuffled input at a token is its patches'
    features stacked in the layout's patch -> token order, tile by tile and for the global image."""
    shuffle_addressing_holds(eager.model, eager.inputs, 2)


@torch.no_grad()
def test_pixel_shuffle_by_four():
    """SmolVLM's small checkpoints fold 4 x 4 patches into a token: 16 patches each, same rule."""
    hf_model, processor = tiny_idefics3("smolvlm", patch_size=2, scale_factor=4)
    model = HookedMLLM.from_hf(hf_model, processor)
    shuffle_addressing_holds(model, model.prepare(tier.random_images(3), ["a", "b", "c"]), 4)


def shuffle_addressing_holds(model, inputs, r: int) -> None:
    _, cache = model.run_with_cache(inputs, names_filter=["adapter.hook_in", "adapter.hook_hidden"])
    vision, shuffled = cache["adapter.hook_in"], cache["adapter.hook_hidden"]
    layout = inputs.layout
    assert vision.shape[:2] == layout.vision_shape and shuffled.shape[:2] == layout.adapter_shape
    real = (inputs.pixel_values != 0).flatten(2).any(2).sum()
    assert layout.vision_shape[0] == real < inputs.pixel_values.shape[:2].numel(), "padding frames are dropped"
    d = model.cfg.vision.d_model
    for span in layout.spans:
        for segment in span.segments:
            patches = vision[segment.vision_index]
            for token in range(len(segment.tokens)):
                fed = patches[segment.patch_to_token == token]
                assert len(fed) == r * r
                row = shuffled[tuple(i[token] for i in segment.adapter_index)]
                assert {tuple(x.tolist()) for x in row.view(r * r, d)} == {tuple(x.tolist()) for x in fed}


def test_every_analysis_runs(eager):
    # at 48 px the canvas is the image itself (3 x 3 tiles); at 32 px the random-weight ridge probe
    # happens to confuse no pair of classes, which the anchor knockout needs
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=48)
    tier.every_analysis_runs(eager.model, scenes)


@pytest.mark.parametrize("size", [(12, 17), (90, 200), (61, 37)], ids=["upscaled", "wide", "tall"])
def test_masks_follow_the_processors_resizes(eager, size):
    """A mask labelling every pixel with its row (and column), sent through `transform_mask`, has
    the canvas's size, keeps the order of rows and columns, and each tile's patch boxes hold the
    canvas pixels the processor cut that tile from (a constant image: every tile equal)."""
    model = eager.model
    height, width = size
    rows = np.repeat(np.arange(height)[:, None], width, axis=1)
    mapped = model.transform_mask(rows)
    inputs = model.prepare([Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8))], "")
    span = inputs.layout.spans[0]
    assert mapped.shape == span.canvas
    canvas_h = mapped.shape[0]
    centres = (np.arange(canvas_h) + 0.5) * height / canvas_h  # where each canvas row's centre falls
    assert (np.diff(mapped[:, 0]) >= 0).all() and (mapped == mapped[:, :1]).all()
    assert np.abs(mapped[:, 0] - centres).max() <= height / canvas_h + 1, "nearest-neighbour, two resizes"
    box = span.segments[-1].tokens.boxes  # the global image covers the whole canvas
    assert box[:, :2].min() == 0 and tuple(box[:, 2:].max(0).values.tolist()) == span.canvas


def test_frames_of_another_row_are_refused(eager):
    """The model fills image tokens with the real frames in order; a frame moved to another row
    would silently feed that row's tokens, so the row counts must match."""
    model, inputs = eager.model, eager.inputs
    pixels = inputs.pixel_values.clone()
    pixels[0, -1] = pixels[-1, 0]
    pixels[-1, 0] = 0
    with pytest.raises(InputError, match="real"):
        model({**inputs.hf_kwargs(), "pixel_values": pixels})


@torch.no_grad()
def test_transformerlens_bridge_names_are_aliases(eager):
    """TransformerLens 4.3 wraps Idefics3 (not SmolVLM) with LLaVA's component names."""
    model, inputs = eager.model, eager.inputs
    names = {"vision_encoder.encoder_layers.1.hook_out": "vision.blocks.1.hook_resid_post",
             "vision_encoder.post_layernorm.hook_out": "vision.ln_post.hook_normalized",
             "vision_projector.hook_in": "adapter.hook_in", "vision_projector.hook_out": "adapter.hook_out",
             "blocks.0.attn.hook_out": "blocks.0.hook_attn_out"}
    _, cache = model.run_with_cache(inputs, names_filter=list(names) + list(names.values()))
    for bridge, ours in names.items():
        assert torch.equal(cache[bridge], cache[ours]), bridge


@torch.no_grad()
def test_two_images_in_one_row(eager):
    """A row's images are one frame list in pixel_values; the layout numbers their frames in
    order, so what the adapter made for each image is what the LLM got at its tokens."""
    model = eager.model
    images = tier.random_images(3)
    inputs = model.prepare([[images[0], images[2]], [images[1]]], ["<image> and <image> ?", "<image> what"])
    layout = inputs.layout
    assert [(s.row, s.image_index) for s in layout.spans] == [(0, 0), (0, 1), (1, 2)]
    assert layout.spans[0].canvas != layout.spans[1].canvas
    ours = model.run_with_hooks(inputs, fwd_hooks=[(lambda name: True, lambda x, hook: x.clone())])
    theirs = eager.reference(**inputs.hf_kwargs()).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    _, cache = model.run_with_cache(inputs, names_filter=["adapter.hook_out", "hook_multimodal_embed"])
    present = layout.table("llm").present
    assert torch.equal(layout.gather("adapter", cache["adapter.hook_out"])[present],
                       layout.gather("llm", cache["hook_multimodal_embed"])[present])

    # each image's picture (recovery maps draw on it) is its own frames, found through its span:
    # the same frames the processor makes for that image alone, its tiles back in their raster
    for span, image in zip(layout.spans, [images[0], images[2], images[1]]):
        alone = model.prepare([image], "<image> what").pixel_values[0]
        picture = model.architecture.image_pixels(inputs.pixel_values, span.image_index, span=span)
        assert picture.shape[-2:] == span.canvas
        tile = alone.shape[-1]
        rows, cols = span.canvas[0] // tile, span.canvas[1] // tile
        for r in range(rows):
            for c in range(cols):
                assert torch.equal(picture[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile], alone[r * cols + c])
    with pytest.raises(InputError, match="span"):
        model.architecture.image_pixels(inputs.pixel_values, 1)
