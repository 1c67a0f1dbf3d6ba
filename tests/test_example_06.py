"""examples/06_tl_exploratory_analysis.py keeps TL's invariants on an image question."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from mmlens import HookedMLLM

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "06_tl_exploratory_analysis.py"


@pytest.fixture(scope="module")
def result():
    spec = importlib.util.spec_from_file_location("example_06", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.analyse(HookedMLLM.from_pretrained("tiny-shapes-llava"), n_pairs=2, pool=100)


def test_attributions_sum_to_the_logit_difference(result):
    mean_diff = result.logit_diff.mean()
    assert result.layer_labels[0] == "embed"
    torch.testing.assert_close(result.layer_attr.sum(), mean_diff, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.head_attr.sum() + result.head_remainder, mean_diff, atol=1e-4, rtol=0)


def test_logit_lens_ends_at_the_model_logits(result):
    assert result.lens_labels[-1] == "final_post"
    torch.testing.assert_close(result.lens[-1], result.logit_diff.mean(), atol=1e-5, rtol=0)


def test_decomposition_sums_to_the_residual_at_image_positions(result):
    assert result.image_decomposition_error < 1e-4


def test_patching_table_covers_every_layer_and_group(result):
    n_layers = result.head_attr.shape[0]
    assert result.patched.shape == (n_layers, len(result.patch_labels))
    assert sum(label.startswith("image row") for label in result.patch_labels) == 8
    assert torch.isfinite(result.patched).all()
    layer, head, (row, col) = result.top_head_cell
    assert 0 <= layer < n_layers and 0 <= row < 8 and 0 <= col < 8
