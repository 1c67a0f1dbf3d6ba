"""ImageTokenLayout is derived from ids and config: padding, several images, CLS, grids; and
layouts made of segments (packed sequences, merges, images of different sizes) built by hand."""

from __future__ import annotations


import pytest
import torch

from mmlens import HookedMLLM
from mmlens.errors import LayoutMismatchError
from mmlens.model.images.layout import GridCells, ImageSpan, ImageTokenLayout, Segment
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


def _packed_layout():
    """Two images in a packed-sequence model with a 2x2 merge (Qwen2-VL style), built by hand:
    image 0 (row 0): 4x4 patches -> 2x2 tokens at positions 1..4 of a 4x4 canvas; image 1 (row 1):
    2x4 patches -> 1x2 tokens at positions 2, 3 of a 2x4 canvas, and an "end" marker at 4."""
    def merged(rows, cols):  # patch (r, c) feeds token (r // 2, c // 2)
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        return ((r // 2) * (cols // 2) + c // 2).flatten()

    first = Segment("image", GridCells.uniform(2, 2, 4, 4), torch.arange(1, 5), (torch.arange(4),),
                    GridCells.uniform(4, 4, 4, 4), (torch.arange(16),), merged(4, 4))
    second = Segment("image", GridCells.uniform(1, 2, 2, 4), torch.tensor([2, 3]), (torch.arange(4, 6),),
                     GridCells.uniform(2, 4, 2, 4), (torch.arange(16, 24),), merged(2, 4))
    images = ((ImageSpan(0, 0, (first,), (4, 4)),), (ImageSpan(1, 1, (second,), (2, 4), {"end": torch.tensor([4])}),))
    return ImageTokenLayout(images, seq_len=6, vision_shape=(24,), adapter_shape=(6,))


def test_a_packed_layout_gathers_images_of_different_sizes_padded():
    layout = _packed_layout()
    assert not layout.uniform and layout.n_rows("vision") == 16 and layout.n_rows("llm") == 4
    vision = torch.arange(24.0)[:, None]
    taken = layout.gather("vision", vision)
    assert taken.shape == (2, 16, 1) and torch.equal(taken[1, :8, 0], torch.arange(16.0, 24.0))
    assert (taken[1, 8:] == 0).all() and torch.equal(layout.table("vision").present.sum(1), torch.tensor([16, 8]))
    llm = torch.arange(12.0).view(2, 6)
    assert torch.equal(layout.gather("llm", llm), torch.tensor([[1.0, 2, 3, 4], [8, 9, 0, 0]]))
    assert torch.equal(layout.gather("adapter", torch.arange(6.0)), torch.tensor([[0.0, 1, 2, 3], [4, 5, 0, 0]]))
    with pytest.raises(LayoutMismatchError, match="leading"):
        layout.gather("vision", torch.zeros(23, 1))
    with pytest.raises(LayoutMismatchError, match="own token grids"):
        layout.token_grid
    table = layout.table("llm")
    assert table.boxes[1, :2].tolist() == [[0, 0, 2, 2], [0, 2, 2, 4]] and table.canvas.tolist() == [[4, 4], [2, 4]]


def test_a_selected_token_selects_every_patch_merged_into_it():
    layout = _packed_layout()
    selected = torch.zeros(2, 6, dtype=torch.bool)
    selected[0, 2] = True  # image 0, token (0, 1): patches (0..1, 2..3)
    selected[1, 3] = True  # image 1, token (0, 1): patches 16 + (0..1, 2..3) of a 2x4 grid
    patches = layout.scatter_vision(selected)
    assert patches.shape == (24,)
    assert patches.nonzero().flatten().tolist() == [2, 3, 6, 7, 18, 19, 22, 23]
    assert layout.scatter_adapter(selected).nonzero().flatten().tolist() == [1, 5]
    assert not layout.vision_aligned


def test_a_repeated_packed_layout_shifts_its_vision_rows():
    layout = _packed_layout()
    twice = layout.repeat(2)
    assert twice.vision_shape == (48,) and twice.adapter_shape == (12,) and twice.batch_size == 4
    vision = torch.randn(24, 3)
    assert torch.equal(twice.gather("vision", vision.repeat(2, 1)), layout.gather("vision", vision).repeat(2, 1, 1))
    assert [s.image_index for s in twice.spans] == [0, 1, 2, 3] and twice.spans[3].row == 3


def test_special_tokens_outside_the_image_block_and_every_grid():
    layout = _packed_layout()
    assert layout.special_positions("end").nonzero().tolist() == [[1, 4]]
    assert layout.image_of_position()[1].tolist() == [-1, -1, 0, 0, -1, -1]  # "end" is not in the block
    assert not (layout.image_token_mask() & layout.special_positions("end")).any()


def test_tokens_of_a_segment_layout_are_labelled_from_their_boxes():
    """Masks of two sizes, padded with ignore: each token takes its box's majority class, rows past
    an image's tokens are invalid, and the pixel map paints each image with its own tokens."""
    from mmlens.probing.token_labels import token_labels

    layout = _packed_layout()
    masks = torch.full((2, 4, 4), 255)
    masks[0] = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 0, 0], [3, 3, 0, 255]])
    masks[1, :2] = torch.tensor([[4, 4, 5, 5], [4, 255, 5, 5]])
    labels = token_labels(masks, layout, n_classes=6)
    assert labels.labels.tolist() == [[1, 2, 3, 0], [4, 5, 255, 255]]
    assert labels.valid.tolist() == [[True] * 4, [True, True, False, False]]
    assert labels.valid_fraction[1, 0] == 0.75
    pixels = layout.pixel_map("llm")
    assert pixels[1].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [-1] * 4, [-1] * 4]
