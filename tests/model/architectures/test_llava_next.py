"""LLaVA-NeXT: anyres tiles + base image + row newlines, a token count per image from its size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmlens.data import load_segmentation
from mmlens.testing_families import tiny_llava_next

import family_tier as tier
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures


family, eager, builder = tier.fixtures({"llava_next": lambda attn: tiny_llava_next(attn_implementation=attn)})


def test_token_counts_are_the_processors(eager):
    """Each image's tokens (base grid + unpadded tiles + one newline per row) are as many as the
    processor expanded its placeholder into, and its images differ in size and so in count."""
    model, inputs = eager.model, eager.inputs
    processor = model.processor
    tile = model.cfg.vision.image_size
    counts = []
    for span, (height, width) in zip(inputs.layout.spans, inputs.extra["image_sizes"].tolist()):
        expected = processor._get_number_of_features(height, width, tile, tile) - 1  # "default" drops CLS
        n = len(span.positions) + len(span.special["newline"])
        assert n == expected and span.canvas == (height, width)
        assert [s.kind for s in span.segments] == ["base", "tiles"]
        assert len(span.special["newline"]) == span.segments[1].tokens.rows
        counts.append(n)
    assert len(set(counts)) > 1, "the batch must hold images with different token counts"


@torch.no_grad()
def test_vision_addressing_follows_the_tiles(eager):
    """The projector reads vision block 0's output without CLS (feature layer -2): read through the
    layout, the vision patches and the adapter inputs are the same rows, tile by tile."""
    model, inputs = eager.model, eager.inputs
    _, cache = model.run_with_cache(inputs, names_filter=["vision.blocks.0.hook_resid_post", "adapter.hook_in"])
    layout = inputs.layout
    vision = cache["vision.blocks.0.hook_resid_post"]
    tiles = sum(model.architecture.geometry(model.cfg, s.canvas).n_tiles for s in layout.spans)
    assert vision.shape[0] == layout.vision_shape[0] == tiles < inputs.pixel_values.shape[:2].numel()
    assert torch.equal(layout.gather("vision", vision), layout.gather("adapter", cache["adapter.hook_in"]))
    assert layout.vision_aligned and not layout.uniform


def test_newlines_are_in_the_image_block_but_not_in_its_grid(eager):
    layout = eager.inputs.layout
    newline = layout.special_positions("newline")
    assert newline.any() and not (newline & layout.image_token_mask()).any()
    assert ((layout.image_of_position() >= 0) | ~newline).all()


def test_every_analysis_runs(eager):
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)
    tier.every_analysis_runs(eager.model, scenes)


@pytest.mark.parametrize("size", [(12, 17), (90, 200)], ids=["upscaled", "downscaled"])
def test_boxes_hold_the_pixels_each_token_was_made_from(eager, size):
    """Send masks labelling every pixel with its row (and its column) through the processor's own
    tiling: every tile pixel under a token's patch came from inside that token's box in the original
    image, or from the pixel just past its end (an upscaled pixel straddles two features; boxes tile
    the image, so it goes to the next box, whose first pixel it is)."""
    model = eager.model
    height, width = size
    rows = np.repeat(np.arange(height)[:, None], width, axis=1)
    cols = np.repeat(np.arange(width)[None, :], height, axis=0)
    tile_rows, tile_cols = (model.geometry.tile_masks(m, ignore_index=-1) for m in (rows, cols))
    inputs = model.prepare([Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8))], "")
    assert tile_rows.shape[0] == inputs.layout.vision_shape[0]
    patch = model.cfg.vision.patch_size
    prefix = model.architecture.vision_prefix_tokens(model.cfg)
    for segment in inputs.layout.spans[0].segments:
        for (tile, position), (y0, x0, y1, x1) in zip(zip(*(i.tolist() for i in segment.vision_index)),
                                                     segment.patches.boxes.tolist()):
            r, c = divmod(position - prefix, model.cfg.vision.image_size // patch)
            window = (tile, slice(r * patch, (r + 1) * patch), slice(c * patch, (c + 1) * patch))
            ys, xs = tile_rows[window], tile_cols[window]
            ys, xs = ys[ys >= 0], xs[xs >= 0]
            assert len(ys), "a kept feature saw some of the image"
            assert (ys >= y0).all() and (ys <= y1).all() and (xs >= x0).all() and (xs <= x1).all(), segment.kind
            # inner boxes start at their feature's first source pixel (the outer ones at the image's edge)
            assert (ys.min() == y0 or y0 == 0) and (xs.min() == x0 or x0 == 0)


def test_masks_stay_in_the_original_pixels(eager):
    model = eager.model
    mask = np.random.default_rng(0).integers(0, 5, size=(21, 34)).astype(np.uint8)
    assert np.array_equal(model.transform_mask(mask), mask)


@torch.no_grad()
def test_corruptions_and_groups_respect_images_with_fewer_tokens(eager):
    """The mean adapter output leaves padding rows out; class groups drop them; resampling tokens
    across images of different grids is refused (there is no same cell to take)."""
    from mmlens.errors import InputError
    from mmlens.interventions import GroupContext, TokenGroup
    from mmlens.interventions.corruptions import anchors_removed, mean_adapter_output

    model, inputs = eager.model, eager.inputs
    layout = inputs.layout
    _, cache = model.run_with_cache(inputs, names_filter="adapter.hook_out")
    rows = layout.gather("adapter", cache["adapter.hook_out"])[layout.table("adapter").present]
    torch.testing.assert_close(mean_adapter_output(model, [inputs]), rows.mean(0), atol=1e-6, rtol=0)
    labels = torch.zeros(layout.table("llm").present.shape, dtype=torch.long)  # every row class 0, padding too
    group = TokenGroup.of_class(0).resolve(inputs, GroupContext(token_labels=labels))
    assert torch.equal(group, layout.image_token_mask())
    with pytest.raises(InputError, match="same grid"):
        anchors_removed(model, inputs, group, replacement="resample")


@torch.no_grad()
def test_bare_ids_still_name_tokens_and_cache(eager):
    """Without image_sizes the layout is unknown: token names stay plain and a cache has no layout,
    but nothing fails; with the inputs, newlines are named."""
    model, inputs = eager.model, eager.inputs
    names = model.to_str_tokens(inputs.input_ids)
    assert "<image>" in names[0] and not any(n.startswith("<img") for n in names[0])
    assert "<img0 newline>" in model.to_str_tokens(inputs)[0]
    text = inputs.input_ids.clone()
    text[text == model.cfg.image_token_id] = inputs.input_ids[0, 0]
    _, cache = model.run_with_cache(text, names_filter="blocks.0.hook_resid_post")
    assert cache.layout is not None and cache.layout.n_images == 0
