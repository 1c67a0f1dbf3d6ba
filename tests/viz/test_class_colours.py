"""One palette for every figure that colours classes, and masks drawn the way their image is.

A class whose name says a colour is drawn in it (`red_circle` red) in a mask figure, in a probe
prediction figure and in their legends alike; a mask's row 0 is on top, as in the image beside it.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation, segmentation_info
from mmlens.errors import InputError
from mmlens.probing import probe_sweep
from mmlens.viz import class_colours, plot_image_and_mask, plot_probe_predictions


def drawn_colour(heatmap: go.Heatmap, value: int) -> str:
    """The colour a heatmap paints `value` in: its colour scale read at the value's position."""
    position = (value - heatmap.zmin) / (heatmap.zmax - heatmap.zmin)
    steps = [(float(at), colour) for at, colour in heatmap.colorscale]
    return next(colour for (at, colour), (upto, _) in zip(steps, steps[1:]) if at <= position <= upto)


def rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))


def reddish(hex_colour: str) -> bool:
    r, g, b = rgb(hex_colour)
    return r > g + 60 and r > b + 60


@pytest.fixture(scope="module")
def scenes():
    return load_segmentation("scenes", split="validation", n=24, seed=0)


@pytest.fixture(scope="module")
def sweep(scenes):
    torch.set_grad_enabled(False)
    try:
        model = HookedMLLM.from_pretrained("tiny-shapes-llava")
        yield probe_sweep(model, scenes, sites=["adapter.hook_in", "adapter.hook_out", "blocks.3.hook_resid_post"],
                          probe="ridge", progress=False, n_boot=1000)
    finally:
        torch.set_grad_enabled(True)


def test_colour_names_give_the_colour_and_others_a_fixed_palette():
    names = segmentation_info(load_segmentation("scenes", split="validation", n=1, seed=0)).class_names
    colours = dict(zip(names, class_colours(names)))
    assert reddish(colours["red_circle"]) and reddish(colours["red_square"])
    assert colours["red_circle"] != colours["red_square"]                  # same colour, told apart by shade
    r, g, b = rgb(colours["blue_triangle"])
    assert b > r + 60 and b > g + 40
    assert len(set(colours.values())) == len(names)
    plain = class_colours(["background", "wall", "sky", "floor"])
    assert plain == class_colours(["background", "wall", "sky", "floor"]) and len(set(plain)) == 4
    assert plain[0] == class_colours(["background"])[0]                    # background: one quiet grey everywhere
    assert len(set(class_colours([f"class {i}" for i in range(150)]))) == 150  # ADE20K's 150 stay distinct
    grey, gray = class_colours(["grey_cat", "gray_dog"])
    assert grey != gray                                                    # two spellings, one colour: shaded apart
    with pytest.raises(TypeError, match="sequence of class names"):
        class_colours(9)


def test_red_circle_is_red_in_the_mask_and_the_prediction_figure(sweep):
    names = list(sweep.class_names)
    red = names.index("red_circle")
    mask = np.zeros((16, 16), dtype=np.int64)
    mask[:4, :4] = red
    image = np.full((16, 16, 3), 120, dtype=np.uint8)
    in_mask = drawn_colour(next(t for t in plot_image_and_mask(image, mask, names).data if t.type == "heatmap"), red)
    predictions = plot_probe_predictions(sweep, example=0)
    panels = [t for t in predictions.data if t.type == "heatmap"]
    in_predictions = {drawn_colour(panel, red) for panel in panels}
    assert in_predictions == {in_mask} and reddish(in_mask)
    # the legend squares are the colours the panels paint
    for trace in (t for t in predictions.data if t.type == "scatter"):
        assert trace.marker.color == drawn_colour(panels[0], names.index(trace.name))


def test_a_top_left_mask_pixel_is_drawn_top_left(sweep):
    names = ["background", "red_circle"]
    mask = np.zeros((8, 10), dtype=np.int64)
    mask[0, 0] = 1
    fig = plot_image_and_mask(np.zeros((8, 10, 3), dtype=np.uint8), mask, names)
    heatmap = next(t for t in fig.data if t.type == "heatmap")
    assert np.asarray(heatmap.z)[0, 0] == 1 and np.asarray(heatmap.z)[-1, 0] == 0  # z row 0 is mask row 0 ...
    assert fig.layout.yaxis2.autorange == "reversed"                                # ... and row 0 is drawn on top,
    assert fig.layout.yaxis.autorange in (None, "reversed")                         # as plotly draws the image
    # the prediction figure: every mask panel in image orientation, its truth panel unflipped
    predictions = plot_probe_predictions(sweep, example=0)
    truth = np.asarray([t for t in predictions.data if t.type == "heatmap"][0].z, dtype=float)
    expected = sweep.test_masks[0].astype(float)
    expected[expected == sweep.ignore_index] = np.nan
    np.testing.assert_array_equal(truth, expected)
    heatmap_axes = [t.yaxis for t in predictions.data if t.type == "heatmap"]
    assert all(predictions.layout[f"yaxis{a[1:]}"].autorange == "reversed" for a in heatmap_axes)


def test_a_mask_that_does_not_fit_its_image_is_refused():
    with pytest.raises(InputError, match="same size"):
        plot_image_and_mask(np.zeros((8, 8, 3), dtype=np.uint8), np.zeros((4, 4), dtype=np.int64), ["background"])


def test_values_outside_the_classes_are_left_blank():
    mask = np.array([[0, 1], [255, 1]])
    heatmap = next(t for t in plot_image_and_mask(np.zeros((2, 2, 3), np.uint8), mask, ["background", "red_circle"]).data
                   if t.type == "heatmap")
    assert np.isnan(np.asarray(heatmap.z, dtype=float)[1, 0]) and heatmap.text[1][0] == "ignore"
