"""token_labels: majority class per token box, validity threshold, soft labels, both grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmlens.probing import token_labels
from mmlens.model.images.layout import TokenGrid

from conftest import build_tiny


def test_majority_validity_and_fractions_by_hand():
    grid = TokenGrid(2, 2, image_size=(4, 4))  # four 2x2 boxes
    mask = np.array(
        [
            [1, 1, 2, 255],
            [1, 2, 255, 255],
            [0, 0, 3, 3],
            [0, 255, 3, 3],
        ]
    )
    out = token_labels(mask, grid, n_classes=4, min_valid_fraction=0.5)
    assert out.labels.tolist() == [[1, 255, 0, 3]]  # box 1 has 1 valid pixel of 4 -> invalid
    assert out.valid.tolist() == [[True, False, True, True]]
    torch.testing.assert_close(out.fractions[0, 0], torch.tensor([0.0, 0.75, 0.25, 0.0]))
    torch.testing.assert_close(out.valid_fraction[0], torch.tensor([1.0, 0.25, 0.75, 1.0]))
    loose = token_labels(mask, grid, n_classes=4, min_valid_fraction=0.2)
    assert loose.labels.tolist() == [[1, 2, 0, 3]]


def test_labels_on_both_grids_of_a_real_layout():
    tiny = build_tiny("clip")
    layout = tiny.inputs.layout
    size = tiny.model.cfg.vision.image_size
    mask = torch.zeros(2, size, size, dtype=torch.long)
    mask[0, :, size // 2 :] = 2  # right half class 2
    mask[1, : size // 4] = 1  # top quarter class 1
    for stage in ("llm", "vision"):
        out = token_labels(mask, layout, n_classes=3, stage=stage)
        grid = layout.token_grid if stage == "llm" else layout.patch_grid
        cols = grid.cells[:, 1]
        rows = grid.cells[:, 0]
        assert out.labels.shape == (2, len(grid))
        assert torch.equal(out.labels[0], torch.where(cols >= grid.cols // 2, 2, 0))
        assert torch.equal(out.labels[1], torch.where(rows < grid.rows // 4, 1, 0))


def test_bad_masks_are_refused():
    grid = TokenGrid(2, 2, image_size=(4, 4))
    with pytest.raises(ValueError, match="outside 0..2"):
        token_labels(np.full((4, 4), 7), grid, n_classes=3)
    with pytest.raises(ValueError, match="transform masks"):
        token_labels(np.zeros((5, 4)), grid, n_classes=3)
