"""Attention on the image for any head: values per image cell read through the layout equal the
pattern read by hand, on the embedded model and on families whose cells are no square grid
(Qwen2-VL's merged variable grids, LLaVA-NeXT's base image plus tiles); the figures and the
labelled pattern view draw offline in Chromium; bad heads, layers and queries are refused."""

from __future__ import annotations

import pytest
import torch

from conftest import random_images
from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import InputError
from mmlens.experiments.attention_on_image import attention_on_image, attention_pattern
from mmlens.interventions import TokenGroup
from mmlens.testing.browser import drawn_fraction, dump_dom, rendered_figures, screenshot
from mmlens.testing.families.deepseek_vl_hybrid import tiny_deepseek_vl_hybrid
from mmlens.testing_families import tiny_llava_next, tiny_qwen2_vl
from mmlens.viz import plot_attention_on_image, plot_attention_pattern, save_figure
from test_report import require_chromium

PROMPTS = ["what is in the image ?", "how many"]


@pytest.fixture(scope="module")
def shapes():
    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    scenes = load_segmentation("scenes", split="validation", n=2, seed=0)
    return model, model.prepare([scenes[0]["image"], scenes[1]["image"]], PROMPTS)


def pattern_by_hand(model, inputs, name):
    _, cache = model.run_with_cache(inputs, names_filter=[name])
    return cache[name].float().cpu()


def test_llm_attention_on_each_cell_is_the_pattern_read_by_hand(shapes):
    model, inputs = shapes
    layer = 2
    result = attention_on_image(model, inputs, layer, query="last_text")
    pattern = pattern_by_hand(model, inputs, f"blocks.{layer}.attn.hook_pattern")
    layout = inputs.layout
    last = inputs.input_ids.shape[1] - 1  # both prompts end in text (left padding)
    assert result.heads == list(range(model.cfg.llm.n_heads)) and result.values.shape == (4, 2, 64)
    for k, span in enumerate(layout.spans):
        by_hand = pattern[span.row, :, last, span.positions]  # [heads, image tokens]
        torch.testing.assert_close(result.values[:, k], by_hand)
        torch.testing.assert_close(result.mass[:, k], by_hand.sum(-1))
        # the cell grid: token (r, c) of the 8 x 8 grid is row r * 8 + c of the values
        grid = result.segment_grid(1, k)
        assert grid.shape == (8, 8) and grid[3, 5] == by_hand[1, 3 * 8 + 5]
    assert 0 < float(result.mass.min()) and float(result.mass.max()) <= 1 + 1e-6


def test_a_token_group_is_averaged_over_its_positions(shapes):
    model, inputs = shapes
    text = TokenGroup.text().resolve(inputs)
    result = attention_on_image(model, inputs, 1, heads=[0, 3], query="text")
    pattern = pattern_by_hand(model, inputs, "blocks.1.attn.hook_pattern")
    span = inputs.layout.spans[1]
    queries = text[span.row].nonzero().flatten()
    by_hand = pattern[span.row][[0, 3]][:, queries][:, :, span.positions].mean(1)
    torch.testing.assert_close(result.values[:, 1], by_hand)
    single = attention_on_image(model, inputs, 1, heads=3, query=int(queries[0]))
    torch.testing.assert_close(single.values[0, 1], pattern[span.row, 3, queries[0], span.positions])


def test_a_vision_head_from_a_query_patch(shapes):
    model, inputs = shapes
    result = attention_on_image(model, inputs, 1, heads=[2], query=(2, 3), stage="vision", image=1)
    pattern = pattern_by_hand(model, inputs, "vision.blocks.1.attn.hook_pattern")
    segment = inputs.layout.spans[1].segments[0]
    query = segment.vision_index[1][2 * 8 + 3]
    torch.testing.assert_close(result.values[0, 1], pattern[1, 2, query, segment.vision_index[1]])
    assert float(result.mass[0, 0]) == 0  # another image's patches: the tower never sees them together
    assert result.query_patch == (1, 0, 2, 3)


@pytest.mark.parametrize("call, message", [
    (dict(layer=9), r"llm layer must be an integer in 0\.\.3, got 9"),
    (dict(layer=0, heads=[1, 4]), r"llm head must be an integer in 0\.\.3, got 4"),
    (dict(layer=0, query=500), r"query position must be an integer in 0\.\.\d+, got 500"),
    (dict(layer=0, query="last_txt"), r"unknown query group 'last_txt'; did you mean \['last_text'"),
    (dict(layer=0, stage="vision", query=(8, 0)), r"query row must be an integer in 0\.\.7, got 8"),
    (dict(layer=0, stage="vision", query=3), r"a vision-tower query is a patch cell \(row, col\)"),
    (dict(layer=0, stage="vision", query=(0, 0), image=2), r"image must be an integer in 0\.\.1, got 2"),
    (dict(layer=0, stage="adapter"), r"stage must be 'llm'"),
])
def test_bad_heads_layers_and_queries_name_the_valid_range(shapes, call, message):
    model, inputs = shapes
    with pytest.raises(InputError, match=message):
        attention_on_image(model, inputs, **call)


@pytest.mark.parametrize("builder", [lambda: tiny_qwen2_vl("2"), tiny_llava_next], ids=["qwen2-vl", "llava-next"])
def test_cells_that_are_no_square_grid(builder):
    """Images of other sizes: each image's cells (merged 2x2 patches; a base grid and its tiles)
    hold the pattern at exactly its tokens, the segment grids have the layout's shapes and the
    vision query's row is painted on its own tile's patches only."""
    model = HookedMLLM.from_hf(*builder())
    inputs = model.prepare(random_images(2, sizes=((40, 50), (61, 37))), PROMPTS)
    layout = inputs.layout
    result = attention_on_image(model, inputs, 1, heads=[0, 1], query="last")
    pattern = pattern_by_hand(model, inputs, "blocks.1.attn.hook_pattern")
    for k, span in enumerate(layout.spans):
        last = int(inputs.attention_mask[span.row].nonzero().max())  # the row's last token, whichever side pads
        torch.testing.assert_close(result.mass[:, k], pattern[span.row, :2, last, span.positions].sum(-1))
        start = 0
        for s, segment in enumerate(span.segments):
            grid = result.segment_grid(0, k, s)
            assert grid.shape == segment.tokens.shape
            torch.testing.assert_close(grid.flatten(), pattern[span.row, 0, last, segment.positions])
            start += len(segment.positions)
        assert not layout.uniform and result.table.present[k].sum() == start
    # a vision query: its row, read at the patches it shares a tile (or the packed sequence) with
    vision = attention_on_image(model, inputs, 0, heads=[1], query=(1, 1), stage="vision", image=1)
    image, s, r, c = vision.query_patch
    segment = layout.spans[image].segments[s]
    j = r * segment.patches.cols + c
    tower = pattern_by_hand(model, inputs, "vision.blocks.0.attn.hook_pattern")
    lead, position = tuple(int(i[j]) for i in segment.vision_index[:-1]), int(segment.vision_index[-1][j])
    row = tower[lead][1, position]
    same_sequence = torch.stack([i == l for i, l in zip(segment.vision_index[:-1], lead)]).all(0)
    expected = torch.where(same_sequence, row[segment.vision_index[-1]], torch.zeros(()))
    torch.testing.assert_close(vision.segment_grid(1, image, s).flatten(), expected)
    assert float(vision.mass[0, 1 - image]) == 0 and 0 < float(vision.mass[0, image]) <= 1 + 1e-6
    figure = plot_attention_on_image(result, image=1)
    heatmaps = [t for t in figure.data if t.type == "heatmap"]
    finest = result.finest_segment(1)
    assert len(heatmaps) == 2 and list(heatmaps[0].x) == layout.spans[1].segments[finest].tokens.x_edges.tolist()


def test_a_second_towers_heads_are_painted_on_its_own_grid():
    """DeepSeek-VL hybrid's SAM (8x8 patches, windows of 3x3 over the grid padded to 9x9, block 1
    global): a windowed head's row covers its query's window only, found by hand from HF's window
    partition; a global head's row is every patch of the image; the figure titles the grid."""
    model = HookedMLLM.from_hf(*tiny_deepseek_vl_hybrid())
    inputs = model.prepare(random_images(2, sizes=((40, 50), (61, 37))), PROMPTS)
    size, across = 3, 3  # SAM's window and windows per side (8 patches padded to 9)
    for query in ((4, 5), (7, 6)):  # a whole window, and one cut by the grid's edge (padding keys left out)
        r, c = query
        windowed = attention_on_image(model, inputs, 0, heads=[1, 3], query=query, stage="vision.high_res", image=1)
        pattern = pattern_by_hand(model, inputs, "vision.high_res.blocks.0.attn.hook_pattern")
        window = 1 * across * across + (r // size) * across + c // size
        row = pattern[window, [1, 3], (r % size) * size + c % size]  # [heads, window keys]
        expected = torch.zeros(2, 8, 8)
        for kr in range(8):
            for kc in range(8):
                if (kr // size, kc // size) == (r // size, c // size):
                    expected[:, kr, kc] = row[:, (kr % size) * size + kc % size]
        torch.testing.assert_close(windowed.segment_grid(1, 1), expected[0])
        torch.testing.assert_close(windowed.segment_grid(3, 1), expected[1])
        assert float(windowed.mass[0, 0]) == 0 and windowed.query_patch == (1, 0, r, c)
    assert float(windowed.mass.max()) < 1 - 1e-3  # the edge window: attention on padding is not on the image
    full = attention_on_image(model, inputs, 1, heads=[2], query=(2, 6), stage="vision.high_res", image=0)
    pattern = pattern_by_hand(model, inputs, "vision.high_res.blocks.1.attn.hook_pattern")
    torch.testing.assert_close(full.segment_grid(2, 0).flatten(), pattern[0, 2, 2 * 8 + 6])
    assert full.values.shape == (1, 2, 64) and float(full.mass[0, 1]) == 0
    figure = plot_attention_on_image(full, image=0)
    assert "vision.high_res layer 1" in figure.layout.title.text
    heatmaps = [t for t in figure.data if t.type == "heatmap"]
    grid = inputs.layout.on_grid("vision.high_res").spans[0].segments[0].patches
    assert len(heatmaps) == 1 and list(heatmaps[0].x) == grid.x_edges.tolist()
    with pytest.raises(InputError, match=r"or a vision grid of this model \('vision.high_res'\), got 'vision.sam'"):
        attention_on_image(model, inputs, 0, stage="vision.sam", query=(0, 0))
    with pytest.raises(InputError, match=r"vision.high_res head must be an integer in 0\.\.3, got 4"):
        attention_on_image(model, inputs, 0, heads=4, stage="vision.high_res", query=(0, 0))
    with pytest.raises(InputError, match=r"query row must be an integer in 0\.\.7, got 8"):
        attention_on_image(model, inputs, 0, stage="vision.high_res", query=(8, 0))


def test_the_pattern_view_labels_image_tokens_from_the_layout(shapes):
    model, inputs = shapes
    view = attention_pattern(model, inputs, 2, heads=[0, 2], row=1)
    span = inputs.layout.spans[1]
    cells = span.segments[0].tokens.cells
    where = {p: i for i, p in enumerate(view.positions)}
    for position, (r, c) in zip(span.positions.tolist(), cells.tolist()):
        assert view.labels[where[position]] == f"<img1 r{r}c{c}>" and view.is_image[where[position]]
    assert sum(view.is_image) == 64 and len(view.positions) == int(inputs.attention_mask[1].sum())
    pattern = pattern_by_hand(model, inputs, "blocks.2.attn.hook_pattern")
    keep = torch.tensor(view.positions)
    torch.testing.assert_close(view.pattern[1], pattern[1, 2][keep][:, keep])
    figure = plot_attention_pattern(view)
    assert [t.visible for t in figure.data] == [True, False]
    assert [b.label for b in figure.layout.updatemenus[0].buttons] == ["head 0", "head 2"]
    assert "&lt;img1 r3c5&gt;" in figure.layout.yaxis.ticktext
    with pytest.raises(InputError, match=r"llm head must be an integer in 0\.\.3"):
        attention_pattern(model, inputs, 2, heads=7)
    one_row = model.prepare(random_images(1), "what is here ?")  # one row: labels are still that row's
    assert attention_pattern(model, one_row, 0).labels[-4:] == model.to_str_tokens(one_row)[0][-4:]


def test_the_figures_draw_offline_in_chromium(shapes, tmp_path):
    require_chromium()
    model, inputs = shapes
    on_image = plot_attention_on_image(attention_on_image(model, inputs, 2, heads=[0, 1]), image=0)
    pattern = plot_attention_pattern(attention_pattern(model, inputs, 2))
    for name, figure in (("on_image", on_image), ("pattern", pattern)):
        page = save_figure(figure, tmp_path / f"{name}.html")
        figures = rendered_figures(dump_dom(page))
        assert len(figures) == 1 and all(n > 0 for n in figures.values()), (name, figures)
    # the painted panels are drawn, not a blank page with titles
    assert drawn_fraction(screenshot(tmp_path / "on_image.html", tmp_path / "on_image.png", width=1000, height=500)) > 0.2
