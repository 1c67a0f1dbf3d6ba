"""TransformerLens's own patching helpers run with images through `model.with_images`, and give
mmlens's own numbers."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import random_images
from transformer_lens import patching

from mmlens.errors import InputError
from mmlens.interventions import Run, head_sweep, recovery_blocked
from mmlens.interventions.patching import Patch, patch_conditions, run_and_collect
from mmlens.interventions.patching_metrics import logit_difference

RIGHT, WRONG = 5, 6


@pytest.fixture(scope="module")
def pair(tiny_clip):
    model = tiny_clip.model
    clean = model.prepare(random_images(2, seed=1), "how many")
    corrupt = model.prepare(random_images(2, seed=2), "how many")
    return model, clean, corrupt


@torch.no_grad()
def test_tl_residual_patching_with_images_equals_mmlens(pair):
    model, clean, corrupt = pair
    _, clean_cache = model.run_with_cache(clean)
    seq = clean.input_ids.shape[1]
    image_position = int(clean.layout.positions(0)[3])
    cells = [(0, 0), (0, image_position), (1, image_position), (1, seq - 1)]
    index_df = pd.DataFrame(cells, columns=["layer", "pos"])

    def logit_diff(logits):
        return (logits[:, -1, RIGHT] - logits[:, -1, WRONG]).mean()

    theirs = patching.generic_activation_patch(
        model.with_images(corrupt), corrupt.input_ids, clean_cache, logit_diff,
        patching.layer_pos_patch_setter, "resid_pre", index_df=index_df,
    )
    conditions = []
    for layer, position in cells:
        mask = torch.zeros_like(corrupt.input_ids, dtype=torch.bool)
        mask[:, position] = True
        conditions.append(Patch(f"blocks.{layer}.hook_resid_pre", mask))
    ours = patch_conditions(model, clean, corrupt, lambda acts, _: acts["logits"][:, -1, RIGHT] - acts["logits"][:, -1, WRONG], conditions)
    torch.testing.assert_close(theirs, ours.mean(-1), atol=1e-5, rtol=0)
    unpatched = logit_diff(model(corrupt))
    assert not torch.allclose(theirs[1:3], unpatched.expand(2)), "patching an image token changes the metric"


def test_the_view_refuses_ids_whose_images_moved(pair):
    model, clean, corrupt = pair
    view = model.with_images(corrupt)
    moved = corrupt.input_ids.roll(1, dims=1)
    with pytest.raises(InputError, match="image tokens elsewhere"):
        view(moved)
    assert view.cfg is model.cfg and torch.equal(view(corrupt.input_ids), model(corrupt))


@torch.no_grad()
def test_patching_copies_start_at_the_patched_layer(tiny_clip):
    """Copies that patch layer 1's heads never run layer 0 again, nor layer 1's attention (only
    the source and target runs do), and give what a full forward with the patch gives."""
    model, inputs = tiny_clip.model, tiny_clip.inputs
    clean, corrupted = Run(inputs), recovery_blocked(model, inputs)
    metric = logit_difference(answer=RIGHT, wrong=WRONG)
    layer_0_attention = model.hf_model.model.language_model.layers[0].self_attn
    layer_1_queries = model.hf_model.model.language_model.layers[1].self_attn.q_proj
    calls, queries = [], []
    handles = [layer_0_attention.register_forward_hook(lambda *_: calls.append(1)),
               layer_1_queries.register_forward_hook(lambda *_: queries.append(1))]
    try:
        swept = head_sweep(model, clean, corrupted, metric, layers=[1], chunk_size=2)
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == 2, "layer 0 runs for the source and the target only"
    assert len(queries) == 2, "layer 1's attention runs for the source and the target only"
    source = run_and_collect(model, clean, ["blocks.1.attn.hook_z"])["blocks.1.attn.hook_z"]
    ko = corrupted.edit(inputs)
    for head in range(model.cfg.n_heads):
        def put_head(z, hook, head=head):
            z = z.clone()
            z[:, :, head] = source[:, :, head]
            return z

        logits = model.run_with_hooks(inputs, fwd_hooks=[*ko.hooks, ("blocks.1.attn.hook_z", put_head)])
        torch.testing.assert_close(swept[0, head], metric({"logits": logits}, inputs), atol=1e-5, rtol=0)
