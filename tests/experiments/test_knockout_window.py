"""The anchor knockout's default window: the LLM layers whose attention runs after its reference."""

from __future__ import annotations

import pytest

from mmlens.experiments.anchor_knockout import _default_window
from mmlens.probing.sites import site_for


@pytest.mark.parametrize(("reference", "first"), [("hook_multimodal_embed", 0), ("blocks.0.hook_resid_pre", 0),
                                                  ("blocks.0.hook_resid_post", 1), ("adapter.hook_out", 0),
                                                  ("ln_final.hook_normalized", None)])
def test_the_window_starts_at_the_first_block_after_the_reference(tiny_clip, reference, first):
    model = tiny_clip.model
    n = model.cfg.n_layers
    window = _default_window(model, site_for(model, reference))
    assert window == ([] if first is None else list(range(first, n)))
