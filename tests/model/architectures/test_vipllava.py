"""VipLLaVA: LLaVA's fixed grid with a projector that LayerNorms several CLIP layers concatenated."""

from __future__ import annotations

import torch

from mmlens.data import load_segmentation
from mmlens.testing.families.vipllava import tiny_vipllava

import family_tier as tier
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

family, eager, builder = tier.fixtures({"vipllava": lambda attn: tiny_vipllava(attn_implementation=attn)})


@torch.no_grad()
def test_the_projector_reads_its_layers_concatenated_without_cls(eager):
    """`adapter.hook_in` is the hidden states of each feature layer (embeddings included), CLS
    dropped, concatenated in the config's order; the cache's vision residuals are those states."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    assert model.cfg.adapter.feature_layers == (2, 0, 1) and model.cfg.adapter.n_image_tokens == 16
    _, cache = model.run_with_cache(inputs)
    tower = reference.model.vision_tower(inputs.pixel_values, output_hidden_states=True)
    expected = torch.cat([tower.hidden_states[layer][:, 1:] for layer in (-2, -4, 1)], dim=-1)
    torch.testing.assert_close(cache["adapter.hook_in"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["vision.blocks.1.hook_resid_post"], tower.hidden_states[2], atol=1e-5, rtol=0)
    d = model.cfg.vision.d_model
    assert cache["adapter.hook_in"].shape[-1] == 3 * d == model.cfg.adapter.d_in


@torch.no_grad()
def test_patching_one_layers_slice_of_the_projector_input_moves_only_through_the_layernorm(eager):
    """Zeroing the embeddings' slice of `adapter.hook_in` changes the adapter's output on every
    token (the LayerNorm mixes the layers' channels), and equals Hugging Face's projector on the
    edited concatenation."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    d = model.cfg.vision.d_model

    def zero_embeddings(x, hook):
        x = x.clone()
        x[..., d : 2 * d] = 0
        return x

    _, cache = model.run_with_cache(inputs, names_filter=["adapter.hook_in", "adapter.hook_out"])
    edited = zero_embeddings(cache["adapter.hook_in"], None)
    read = {}
    model.run_with_hooks(inputs, fwd_hooks=[("adapter.hook_in", zero_embeddings),
                                            ("adapter.hook_out", lambda x, hook: read.__setitem__("out", x))])
    projector = reference.model.multi_modal_projector
    torch.testing.assert_close(read["out"], projector(edited), atol=1e-5, rtol=0)
    assert ((read["out"] - cache["adapter.hook_out"]).abs().amax(-1) > 1e-4).all()


def test_every_analysis_runs(eager):
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)
    tier.every_analysis_runs(eager.model, scenes)
