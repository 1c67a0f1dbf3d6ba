"""PixelMap: one type paints tokens onto pixels, labels them from their boxes, slices, joins and
saves itself whatever the layout kind, so nothing above `model/` asks which kind it has."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from mmlens.checksums import bytes_sha256, sealed
from mmlens.data import load_segmentation
from mmlens.errors import InputError, LayoutMismatchError
from mmlens.model import ImagePixelMaps, PixelMap, TokenGrid
from mmlens.model.images.layout import GridCells, ImageSpan, ImageTokenLayout, Segment
from mmlens.probing import load_sweep, probe_sweep, save_sweep, token_labels, tokens_to_pixels
from mmlens.viz import plot_probe_predictions

SOURCE = Path(__file__).parents[2] / "src" / "mmlens"
ABOVE_MODEL = ("probing", "viz", "experiments", "runs", "interventions")
# the layout's kind flag, the accessors that exist for one kind only, and type tests on the shared grid
ASKS_THE_KIND = re.compile(r"\.uniform\b|isinstance\(.*TokenGrid|layout\.(token_grid|patch_grid|grid_of|grid)\b")
# refusals, not branches: an operation that has no meaning without one grid for every image
REFUSALS = {"interventions/corruptions.py": "replacement='resample' swaps the same cell between images"}


def test_no_layer_above_model_asks_the_layout_kind():
    found = [f"{path.relative_to(SOURCE)}:{number}: {line.strip()}"
             for package in ABOVE_MODEL for path in sorted((SOURCE / package).rglob("*.py"))
             if path.relative_to(SOURCE).as_posix() not in REFUSALS
             for number, line in enumerate(path.read_text().splitlines(), 1) if ASKS_THE_KIND.search(line)]
    assert not found, "ask the layout's PixelMap (layout.pixels(stage)) instead:\n" + "\n".join(found)


def _base_under_tiles() -> ImageTokenLayout:
    """One 4x4 image (LLaVA-NeXT style, by hand): a 1x1 base token covering it all (position 1),
    then a 2x2 tile grid over the same pixels (positions 2..5)."""
    def segment(kind, rows, positions, first):
        cells = GridCells.uniform(rows, rows, 4, 4)
        index = (torch.arange(first, first + len(cells)),)
        return Segment(kind, cells, positions, index, cells, index, torch.arange(len(cells)))

    span = ImageSpan(0, 0, (segment("base", 1, torch.tensor([1]), 0), segment("tiles", 2, torch.arange(2, 6), 1)),
                     (4, 4))
    return ImageTokenLayout(((span,),), seq_len=6, vision_shape=(5,), adapter_shape=(5,))


def test_overlapping_segments_keep_whole_boxes_while_the_finer_paints():
    layout = _base_under_tiles()
    pixels = layout.pixels("llm")
    assert isinstance(pixels, ImagePixelMaps) and pixels.canvas == (4, 4) and pixels.raster(5) == (1, 5)
    mask = torch.tensor([[[1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 0, 0], [1, 1, 0, 0]]])
    labels = token_labels(mask, pixels, n_classes=3)
    # the base token counts all 16 pixels (class 1 holds 8), though the tiles paint every one of them
    assert labels.labels.tolist() == [[1, 1, 2, 1, 0]]
    torch.testing.assert_close(labels.fractions[0, 0], torch.tensor([0.25, 0.5, 0.25]))
    assert torch.equal(labels.labels, token_labels(mask, layout, n_classes=3).labels)
    predictions = torch.tensor([[7, 10, 11, 12, 13]])
    assert pixels.paint(predictions)[0].tolist() == [[10, 10, 11, 11], [10, 10, 11, 11], [12, 12, 13, 13],
                                                     [12, 12, 13, 13]]
    # read back from its painting (a saved sweep): it paints the same but no longer knows the base's box
    painted = ImagePixelMaps.from_painted(layout.pixel_map("llm"))
    assert painted == pixels and torch.equal(painted.paint(predictions), pixels.paint(predictions))
    with pytest.raises(InputError, match="label tokens from the layout"):
        token_labels(mask, painted, n_classes=3)
    with pytest.raises(ValueError, match="canvases are up to"):
        token_labels(torch.zeros(1, 4, 5, dtype=torch.long), pixels, n_classes=3)


def test_a_shared_grid_paints_what_each_image_s_own_map_paints(tiny_clip):
    layout = tiny_clip.inputs.layout
    grid = layout.pixels("llm")
    assert isinstance(grid, TokenGrid) and grid.raster(len(grid)) == grid.shape
    own = ImagePixelMaps.from_painted(layout.pixel_map("llm"))  # the same images, each on its own
    predictions = torch.randint(0, 5, (layout.n_images, len(grid)))
    assert torch.equal(grid.paint(predictions), own.paint(predictions))
    assert torch.equal(tokens_to_pixels(predictions, layout.pixel_map("llm")), grid.paint(predictions))
    assert grid.images(slice(1, 2)) is grid
    assert torch.equal(own.images(slice(1, 2)).paint(predictions[1:2]), own.paint(predictions)[1:2])


def test_batches_join_into_one_map_of_their_images():
    small, large = torch.zeros(2, 2, 3, dtype=torch.long), torch.ones(1, 4, 4, dtype=torch.long)
    joined = PixelMap.concat([ImagePixelMaps.from_painted(small), ImagePixelMaps.from_painted(large)])
    expected = torch.full((3, 4, 4), -1)
    expected[:2, :2, :3], expected[2] = 0, 1
    assert joined.canvas == (4, 4) and torch.equal(joined.painted, expected)
    grid = TokenGrid(2, 2, (4, 4))
    assert PixelMap.concat([grid, TokenGrid(2, 2, (4, 4))]) is grid
    with pytest.raises(InputError, match="mix images of one fixed grid"):
        PixelMap.concat([grid, joined])
    with pytest.raises(LayoutMismatchError, match="different token grids"):
        PixelMap.concat([grid, TokenGrid(4, 4, (4, 4))])


@pytest.fixture(scope="module")
def scenes():
    return load_segmentation("scenes", split="validation", n=8, seed=0, image_size=32)


def _rewrite(folder: Path, grids: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Set the sweep's "grids" entry and add split tensors by hand, re-hashed and resealed as
    `save_sweep` of sweep format 3 seals them."""
    description = json.loads((folder / "sweep.json").read_text())
    data = safetensors_bytes({**load_file(str(folder / "split.safetensors")), **tensors})
    (folder / "split.safetensors").write_bytes(data)
    description["grids"], description["files"]["split.safetensors"] = grids, bytes_sha256(data)
    (folder / "sweep.json").write_text(json.dumps(sealed(description), indent=1))


def test_sweeps_saved_before_pixel_maps_still_load(tiny_clip, scenes, tmp_path):
    """Format 3 as written before PixelMap: a shared grid as [rows, cols, height, width], per-image
    maps as "pixel_map" with `pixel_map_<grid>` tensors; both load and paint what was saved."""
    sweep = probe_sweep(tiny_clip.model, scenes, sites=["adapter.hook_out"], probe="ridge", alpha=1e-2,
                        sensitivity=False, n_boot=1000, progress=False)
    grid = tiny_clip.inputs.layout.token_grid
    shape = [grid.rows, grid.cols, *grid.image_size]
    shared = save_sweep(sweep, tmp_path / "shared")
    assert json.loads((shared / "sweep.json").read_text())["grids"] == {"vision": shape, "llm": shape}
    _rewrite(shared, {"vision": shape, "llm": shape}, {})
    back = load_sweep(shared, scenes)
    assert back.grids == {"vision": grid, "llm": grid} and back.table.equals(sweep.table)

    # the same held-out images as per-image maps: each pixel's token by hand, from the grid's cells
    n_test, (height, width) = len(sweep.test_indices), grid.image_size
    rows = torch.arange(height)[:, None] * grid.rows // height
    cols = torch.arange(width)[None, :] * grid.cols // width
    by_hand = (rows * grid.cols + cols).expand(n_test, -1, -1).contiguous()
    _rewrite(shared, {"vision": "pixel_map", "llm": "pixel_map"},
             {"pixel_map_vision": by_hand.clone(), "pixel_map_llm": by_hand.clone()})
    own = load_sweep(shared, scenes)
    assert isinstance(own.grids["llm"], ImagePixelMaps) and torch.equal(own.grids["llm"].painted, by_hand)
    predictions = sweep.predictions[("model", "adapter.hook_out")].long()
    assert torch.equal(own.grids["llm"].paint(predictions), grid.paint(predictions))
    assert plot_probe_predictions(own, example=1).to_json() == plot_probe_predictions(sweep, example=1).to_json()
    resaved = save_sweep(own, tmp_path / "again")
    assert json.loads((resaved / "sweep.json").read_text())["grids"] == {"vision": "pixel_map", "llm": "pixel_map"}
    assert torch.equal(load_file(str(resaved / "split.safetensors"))["pixel_map_llm"], by_hand)
