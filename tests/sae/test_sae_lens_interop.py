"""With sae-lens installed: an SAE saved by mmlens loads in sae-lens and one saved by sae-lens (or
handed over as an object) loads in mmlens, with equal encodings and outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mmlens
from mmlens.sae import ARCHITECTURES

from test_sae_maths import D_IN, random_sae

sae_lens = pytest.importorskip("sae_lens")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@torch.no_grad()
def test_mmlens_saves_what_sae_lens_loads_and_back(architecture: str, tmp_path: Path) -> None:
    ours = random_sae(architecture, metadata={"hook_name": "blocks.0.hook_resid_post", "hook_name_out": "blocks.0.hook_mlp_out"})
    ours.save(tmp_path / "ours")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "ours")
    x = torch.randn(5, D_IN)
    assert torch.equal(theirs.encode(x), ours.encode(x))
    assert torch.equal(theirs(x), ours(x))

    theirs.save_model(tmp_path / "theirs")
    for loaded in (mmlens.load_sae(tmp_path / "theirs"), mmlens.load_sae(theirs)):
        assert loaded.cfg.architecture == architecture and loaded.cfg.hook_name == "blocks.0.hook_resid_post"
        assert torch.equal(loaded.encode(x), theirs.encode(x))
        assert torch.equal(loaded(x), theirs(x))


@torch.no_grad()
def test_error_term_matches_sae_lens(tmp_path: Path) -> None:
    ours = random_sae("jumprelu", metadata={"hook_name": "blocks.0.hook_resid_post"})
    ours.save(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    ours.use_error_term = theirs.use_error_term = True
    x = torch.randn(3, 4, D_IN)
    _, their_cache = theirs.run_with_cache(x)
    _, our_cache = ours.run_with_cache(x)
    for name in ("hook_sae_acts_post", "hook_sae_recons", "hook_sae_error", "hook_sae_output"):
        assert torch.equal(our_cache[name], their_cache[name]), name
