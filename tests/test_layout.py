"""ImageTokenLayout is derived from ids and config: padding, several images, CLS, grids."""

from __future__ import annotations


import pytest
import torch

from mmlens import HookedMLLM
from mmlens.testing import tiny_llava

from conftest import build_tiny, random_images


def _expected_positions(input_ids, image_token_id, per_image, with_cls):
    rows = []
    for ids in input_ids:
        where = (ids == image_token_id).nonzero().flatten()
        chunks = where.split(per_image)
        rows.append([c[1:] if with_cls else c for c in chunks])
    return rows


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_positions_follow_the_placeholders(padding_side):
    tiny = build_tiny("clip", padding_side=padding_side)
    layout, ids = tiny.inputs.layout, tiny.inputs.input_ids
    expected = _expected_positions(ids, tiny.model.cfg.image_token_id, 16, with_cls=False)
    assert layout.batch_size == 3 and layout.grid == (4, 4)
    for row, (spans, want) in enumerate(zip(layout.images, expected)):
        assert [s.image_index for s in spans] == [row]
        torch.testing.assert_close(spans[0].positions, want[0])
        assert spans[0].cls_position is None
    starts = {int(layout.positions(r)[0]) for r in range(3)}
    padded_at = 0 if padding_side == "left" else -1
    assert tiny.inputs.attention_mask[:, padded_at].min() == 0
    assert (len(starts) > 1) == (padding_side == "left"), "left padding shifts the image tokens"


def test_cls_strategy_full_keeps_cls_before_the_grid():
    tiny = build_tiny("clip_gqa")  # vision_feature_select_strategy="full"
    cfg = tiny.model.cfg
    assert cfg.adapter.n_image_tokens == 17
    for spans in tiny.inputs.layout.images:
        (span,) = spans
        assert span.positions[0] == span.cls_position + 1
        assert tiny.inputs.input_ids[span.row, span.cls_position] == cfg.image_token_id
    assert tiny.inputs.layout.patch_positions[0] == 1  # CLIP's CLS is vision position 0


def test_siglip_has_no_cls():
    tiny = build_tiny("siglip")
    layout = tiny.inputs.layout
    assert layout.patch_positions[0] == 0 and not tiny.model.cfg.vision.has_cls
    assert tiny.model.cfg.adapter.feature_layers == (tiny.model.cfg.vision.n_layers,)


def test_boxes_cells_and_pixel_map_agree():
    hf, processor = tiny_llava(image_size=40, patch_size=8)
    model = HookedMLLM.from_hf(hf, processor)
    inputs = model.prepare(random_images(1), "how many")
    layout = inputs.layout
    assert layout.grid == (5, 5) and len(layout.positions(0)) == 25
    cells, boxes = layout.token_cells, layout.token_boxes
    torch.testing.assert_close(boxes[:, 0], cells[:, 0] * 8)
    torch.testing.assert_close(boxes[:, 3], cells[:, 1] * 8 + 8)
    pixel_to_token = layout.token_grid.cell_index_map()
    for k, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
        assert (pixel_to_token[y0:y1, x0:x1] == k).all()
    assert pixel_to_token.shape == (40, 40)
    torch.testing.assert_close(layout.patch_to_token, torch.arange(25))


def test_several_images_per_prompt_match_hf():
    tiny = build_tiny("clip")
    images = random_images(3, seed=1)
    inputs = tiny.model.prepare([[images[0], images[1]], [images[2]]], ["compare", "how many"])
    spans = inputs.layout.images
    assert [len(r) for r in spans] == [2, 1]
    assert [s.image_index for r in spans for s in r] == [0, 1, 2]
    assert spans[0][1].positions[0] > spans[0][0].positions[-1]
    with torch.no_grad():
        torch.testing.assert_close(
            tiny.model(inputs), tiny.reference(**inputs.hf_kwargs()).logits, atol=1e-5, rtol=0
        )


def test_vision_feature_layer_is_resolved_from_config():
    hf, processor = tiny_llava(vision_layers=4, vision_feature_layer=-3)
    model = HookedMLLM.from_hf(hf, processor)
    assert model.cfg.adapter.feature_layers == (2,)  # hidden state 2 = output of vision block 1
    inputs = model.prepare(random_images(1), "how many")
    _, cache = model.run_with_cache(inputs, names_filter=["vision.blocks.1.hook_resid_post", "adapter.hook_in"])
    torch.testing.assert_close(cache["adapter.hook_in"], cache["vision.blocks.1.hook_resid_post"][:, 1:])


def test_layout_rejects_truncated_image_tokens():
    tiny = build_tiny("clip")
    ids = tiny.inputs.input_ids.clone()
    ids[0, tiny.inputs.layout.positions(0)[3]] = 5
    with pytest.raises(ValueError, match="not a multiple"):
        tiny.model.layout(ids)


def test_masks_share_the_images_geometry():
    """The model's geometry reproduces its processor, so masks land on the token boxes' pixels."""
    import numpy as np

    tiny = build_tiny("clip")
    images = random_images(3)
    torch.testing.assert_close(tiny.model.geometry.to_pixel_values(images), tiny.inputs.pixel_values)
    mask = np.zeros((40, 50), dtype=np.uint8)
    mask[:, 25:] = 3
    out = tiny.model.transform_mask(mask)
    size = tiny.model.cfg.vision.image_size
    assert out.shape == (size, size) and set(np.unique(out)) <= {0, 3}


def test_by_image_takes_each_images_grid_tokens_in_pixel_values_order():
    tiny = build_tiny("clip", padding_side="left")
    images = random_images(3)
    inputs = tiny.model.prepare([[images[0], images[1]], [images[2]]], ["compare the two", "how many"])
    layout = inputs.layout
    values = torch.arange(inputs.input_ids.numel()).view(inputs.input_ids.shape)
    taken = layout.by_image(values)
    assert taken.shape == (3, len(layout.token_grid))
    for span in layout.spans:
        assert torch.equal(taken[span.image_index], values[span.row, span.positions])
    features = torch.randn(*inputs.input_ids.shape, 5)
    assert layout.by_image(features).shape == (3, len(layout.token_grid), 5)


@torch.no_grad()
def test_gather_reads_each_stage_at_the_same_grid_tokens():
    """With the CLS token kept ("full"), the adapter output has one more token than the grid: the
    accessor skips it, and the LLM's merged input at the grid positions is that same output."""
    tiny = build_tiny("clip_gqa")
    layout = tiny.inputs.layout
    _, cache = tiny.model.run_with_cache(tiny.inputs, names_filter=["adapter.hook_out", "hook_multimodal_embed",
                                                                    "vision.blocks.0.hook_resid_post"])
    adapter = cache["adapter.hook_out"]
    torch.testing.assert_close(layout.gather("adapter", adapter), adapter[:, 1:], atol=0, rtol=0)
    torch.testing.assert_close(layout.gather("llm", cache["hook_multimodal_embed"]), adapter[:, 1:], atol=0, rtol=0)
    vision = cache["vision.blocks.0.hook_resid_post"]
    assert layout.gather("vision", vision).shape[1] == len(layout.patch_grid) == vision.shape[1] - 1
    first = torch.zeros(tiny.inputs.input_ids.shape, dtype=torch.bool)
    for span in layout.spans:
        first[span.row, span.positions[0]] = True
    selected = layout.scatter_adapter(first)
    assert selected.shape == adapter.shape[:2] and selected[:, 1].all() and selected.sum() == layout.n_images
    assert layout.scatter_vision(first)[:, 1].all() and layout.scatter_vision(first).sum() == layout.n_images
