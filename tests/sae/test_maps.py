"""SAE features painted over the image through the layout: a fixed grid (LLaVA) and anyres tiles
(LLaVA-NeXT), vision and adapter SAEs; top-activating images and their crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import InputError
from mmlens.sae import canvas_picture, feature_maps, top_activations
from mmlens.testing import tiny_llava
from mmlens.testing.families.llava_next import tiny_llava_next

from test_splice import sae_at

PROMPT = "what is in the image ?"


@pytest.fixture(scope="module")
def scenes():
    return load_segmentation("scenes", split="train", n=4)


@pytest.fixture(scope="module")
def llava(scenes):
    model = HookedMLLM.from_hf(*tiny_llava())
    return model, model.prepare([s["image"] for s in scenes][:3], [PROMPT] * 3)


@pytest.fixture(scope="module")
def llava_next(scenes):
    model = HookedMLLM.from_hf(*tiny_llava_next())
    return model, model.prepare([s["image"] for s in scenes][:3], [PROMPT] * 3)


def cached_features(model, inputs, sae):
    name = f"{sae.cfg.hook_name}.hook_sae_acts_post"
    _, cache = model.run_with_cache_with_saes(inputs, saes=[sae], use_error_term=True, names_filter=[name])
    return cache[name]


@torch.no_grad()
def test_adapter_features_on_the_fixed_grid_are_the_cached_activations_at_each_cell(llava) -> None:
    model, inputs = llava
    sae = sae_at("adapter.hook_out", model.cfg.d_model)
    features = [3, 7, 11]
    maps = feature_maps(model, sae, inputs, features)
    acts = cached_features(model, inputs, sae)  # [images, image tokens, d_sae]: adapter rows, raster order
    rows, cols = inputs.layout.token_grid.shape
    for k in range(3):
        (segment,) = maps.segments[k]
        assert segment.kind == "grid" and segment.values.shape == (3, rows, cols)
        torch.testing.assert_close(segment.values, acts[k][:, features].T.reshape(3, rows, cols))
    painted = maps.painted(7)
    boxes = inputs.layout.token_grid.boxes
    for token, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
        assert torch.all(painted[:, y0:y1, x0:x1] == acts[:, token, 7][:, None, None])
    assert not painted.isnan().any() and maps.left_out == {}


@torch.no_grad()
def test_vision_features_draw_the_patch_grid_and_name_the_cls_they_leave_out(llava) -> None:
    model, inputs = llava
    sae = sae_at("vision.blocks.0.hook_resid_post", model.cfg.vision.d_model)
    maps = feature_maps(model, sae, inputs, [1, 2])
    acts = cached_features(model, inputs, sae)  # [images, CLS + patches, d_sae]
    rows, cols = inputs.layout.patch_grid.shape
    for k in range(3):
        torch.testing.assert_close(maps.segments[k][0].values, acts[k, 1:, [1, 2]].T.reshape(2, rows, cols))
    assert list(maps.left_out.values()) == [3]  # one CLS per image, reported, not drawn into a cell


@torch.no_grad()
def test_tiled_images_get_a_map_per_segment_and_the_finer_tile_paints_the_pixel(llava_next) -> None:
    model, inputs = llava_next
    sae = sae_at("adapter.hook_out", model.cfg.d_model)
    maps = feature_maps(model, sae, inputs, [5])
    layout = inputs.layout
    acts = cached_features(model, inputs, sae)[..., 5]  # adapter rows [tiles, tokens]
    for k, span in enumerate(layout.spans):
        assert [s.kind for s in maps.segments[k]] == [s.kind for s in span.segments] == ["base", "tiles"]
        for segment, drawn in zip(span.segments, maps.segments[k]):
            expected = acts[segment.adapter_index]  # this segment's tokens in raster order
            assert drawn.values.shape == (1, *segment.tokens.shape)
            torch.testing.assert_close(drawn.values[0].flatten(), expected)
        tiles = span.segments[1]
        painted = maps.painted(5)[k]
        for token, (y0, x0, y1, x1) in enumerate(tiles.tokens.boxes.tolist()):
            if y1 > y0 and x1 > x0:  # the tile's cell paints over the base image's coarser cell
                assert torch.all(painted[y0:y1, x0:x1] == acts[tiles.adapter_index][token])
    n_newlines = sum(len(s.special["newline"]) for s in layout.spans)
    assert maps.left_out == {"newline": n_newlines} and n_newlines > 0
    vision_sae = sae_at("vision.blocks.0.hook_resid_post", model.cfg.vision.d_model)
    vision = feature_maps(model, vision_sae, inputs, [2])
    vision_acts = cached_features(model, inputs, vision_sae)[..., 2]  # [tiles, CLS + patches]
    for k, span in enumerate(layout.spans):
        for segment, drawn in zip(span.segments, vision.segments[k]):
            assert drawn.values.shape == (1, *segment.patches.shape)
            torch.testing.assert_close(drawn.values[0].flatten(), vision_acts[segment.vision_index])


@torch.no_grad()
def test_figure_shows_the_picture_and_one_panel_per_feature(llava_next, scenes) -> None:
    model, inputs = llava_next
    sae = sae_at("adapter.hook_out", model.cfg.d_model)
    maps = feature_maps(model, sae, inputs, [5, 9])
    picture = canvas_picture(model, scenes[1]["image"])
    fig = maps.figure(image=1, picture=picture)
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == 2 and [t.type for t in fig.data].count("image") == 1
    assert np.asarray(heatmaps[0].z).shape == picture.shape[:2] == tuple(inputs.layout.table("llm").canvas[1].tolist())


def test_features_out_of_range_are_refused_before_any_forward(llava) -> None:
    model, inputs = llava
    sae = sae_at("adapter.hook_out", model.cfg.d_model)
    with pytest.raises(InputError, match="features \\[256\\]"):
        feature_maps(model, sae, inputs, [0, 256])


@torch.no_grad()
def test_top_activations_rank_images_by_their_best_token_and_crop_its_box(llava, scenes) -> None:
    model, _ = llava
    sae = sae_at("adapter.hook_out", model.cfg.d_model)
    inputs = model.prepare([s["image"] for s in scenes], [PROMPT] * 4)
    acts = cached_features(model, inputs, sae)  # one batch of all four: the same per image
    fires_everywhere = (acts.amax(1) > 0).all(0)
    features = fires_everywhere.nonzero().flatten()[:2].tolist()
    dead = int((acts.amax((0, 1)) == 0).nonzero()[0])
    found = top_activations(model, sae, scenes, [*features, dead], prompt=PROMPT, k=2, batch_size=3)
    assert found[dead] == []  # a feature that never fires has no top images
    boxes = inputs.layout.token_grid.boxes
    for feature in features:
        best = acts[..., feature].max(1).values
        order = best.argsort(descending=True)[:2]
        assert [t.image for t in found[feature]] == order.tolist()
        for top in found[feature]:
            token = int(acts[top.image, :, feature].argmax())
            assert top.activation == pytest.approx(float(best[top.image]), abs=1e-5)
            assert top.box == tuple(boxes[token].tolist())
            y0, x0, y1, x1 = top.box
            assert np.array_equal(top.crop, canvas_picture(model, scenes[top.image]["image"])[y0:y1, x0:x1])


def test_learned_queries_have_no_cells_to_draw_and_are_refused_before_any_forward(scenes) -> None:
    from mmlens.errors import LayoutMismatchError
    from mmlens.testing.families.blip2 import tiny_blip2

    model = HookedMLLM.from_hf(*tiny_blip2())
    inputs = model.prepare([scenes[0]["image"]], [PROMPT])
    forwards = []
    model.hook_dict["vision.hook_embed"].add_hook(lambda x, hook: forwards.append(1), is_permanent=True)
    try:
        with pytest.raises(LayoutMismatchError, match="learned queries"):
            feature_maps(model, sae_at("adapter.hook_out", model.cfg.d_model), inputs, [0])
        assert forwards == []
        vision = feature_maps(model, sae_at("vision.blocks.1.hook_resid_post", model.cfg.vision.d_model), inputs, [0])
    finally:
        model.reset_hooks(including_permanent=True)
    assert vision.segments[0][0].values.shape == (1, 4, 4) and len(forwards) == 1
