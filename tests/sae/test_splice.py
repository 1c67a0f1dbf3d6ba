"""SAEs spliced into the llava LLaVA at vision, adapter and LLM points, with SAELens's API."""

from __future__ import annotations

import pytest
import torch

from mmlens import HookedMLLM
from mmlens.errors import HookNameError, InputError
from mmlens.sae import SAE, SAEConfig
from mmlens.testing import tiny_llava

from conftest import random_images

LLM_POINT, VISION_POINT = "blocks.0.hook_resid_post", "vision.blocks.0.hook_resid_post"
SAE_POINTS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error",
              "hook_sae_output")


@pytest.fixture(scope="module")
def llava():
    hf_model, processor = tiny_llava()
    model = HookedMLLM.from_hf(hf_model, processor)
    inputs = model.prepare(random_images(2), ["what is in the image ?", "how many"])
    with torch.no_grad():
        clean = model(inputs)
    return model, inputs, clean


def sae_at(hook_name: str, d_in: int, architecture: str = "standard", seed: int = 0, **cfg) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(architecture, d_in, 4 * d_in, metadata={"hook_name": hook_name}, **cfg))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
    return sae


@torch.no_grad()
def test_error_term_keeps_logits_and_reconstruction_replaces_the_activation(llava) -> None:
    model, inputs, clean = llava
    for point, width in ((LLM_POINT, 64), (VISION_POINT, 32), ("adapter.hook_out", 64)):
        sae = sae_at(point, width)
        kept = model.run_with_saes(inputs, saes=[sae], use_error_term=True)
        torch.testing.assert_close(kept, clean, atol=1e-5, rtol=0)
        spliced = model.run_with_saes(inputs, saes=[sae])
        assert (spliced - clean).abs().max() > 1e-2
        # = a TransformerLens hook putting the SAE's reconstruction in place: the same computation
        by_hand = model.run_with_hooks(inputs, fwd_hooks=[(point, lambda x, hook: sae.decode(sae.encode(x)))])
        assert torch.equal(spliced, by_hand)
        assert model.acts_to_saes == {}


@torch.no_grad()
def test_feature_activations_are_cached_reachable_and_gone_after(llava) -> None:
    model, inputs, clean = llava
    sae = sae_at(LLM_POINT, 64)
    names = [f"{LLM_POINT}.{point}" for point in SAE_POINTS]
    logits, cache = model.run_with_cache_with_saes(inputs, saes=[sae], use_error_term=True)
    assert set(names) <= set(cache.keys())
    torch.testing.assert_close(cache[f"{LLM_POINT}.hook_sae_acts_post"], sae.encode(cache[LLM_POINT]), atol=1e-5, rtol=0)
    _, only = model.run_with_cache_with_saes(inputs, saes=[sae], names_filter=[names[2]])
    assert list(only.keys()) == [names[2]]
    with model.saes(saes=[sae]):
        assert set(names) <= set(model.hook_names("llm"))
        zeroed = model.run_with_hooks(inputs, fwd_hooks=[(names[2], lambda acts, hook: torch.zeros_like(acts))])
        # every feature off: the reconstruction is b_dec at every position
        _, seen = model.run_with_cache(inputs, names_filter=[LLM_POINT, names[2]])
        assert seen[names[2]].abs().sum() > 0
    assert not set(names) & set(model.hook_dict)
    assert sae.hook_sae_acts_post.name == "hook_sae_acts_post"  # its own name again
    with pytest.raises(HookNameError):
        model.run_with_hooks(inputs, fwd_hooks=[(names[2], lambda acts, hook: acts)])
    expected = model.run_with_hooks(inputs, fwd_hooks=[(LLM_POINT, lambda x, hook: torch.zeros_like(x) + sae.b_dec)])
    assert torch.equal(zeroed, expected)
    assert torch.equal(model(inputs), clean)


@torch.no_grad()
def test_several_saes_and_contexts_restore_what_was_there(llava) -> None:
    model, inputs, clean = llava
    llm, vision = sae_at(LLM_POINT, 64), sae_at(VISION_POINT, 32, "topk", k=8)
    both = model.run_with_saes(inputs, saes=[llm, vision])
    by_hand = model.run_with_hooks(inputs, fwd_hooks=[(VISION_POINT, lambda x, hook: vision.decode(vision.encode(x))),
                                                      (LLM_POINT, lambda x, hook: llm.decode(llm.encode(x)))])
    assert torch.equal(both, by_hand)

    model.add_sae(llm, use_error_term=True)
    try:
        other = sae_at(LLM_POINT, 64, seed=1)
        with model.saes(saes=[other], use_error_term=True):
            assert model.acts_to_saes[LLM_POINT] is other and other.use_error_term
            torch.testing.assert_close(model(inputs), clean, atol=1e-5, rtol=0)
        # back as it was, error term included
        assert model.acts_to_saes[LLM_POINT] is llm and llm.use_error_term and not other.use_error_term
        torch.testing.assert_close(model(inputs), clean, atol=1e-5, rtol=0)
        hooked = model.run_with_hooks(inputs, fwd_hooks=[(VISION_POINT, lambda x, hook: x * 1.5)])  # TL hooks still reset
        assert not torch.equal(hooked, model(inputs))
    finally:
        model.reset_saes()
    assert model.acts_to_saes == {} and torch.equal(model(inputs), clean) and not llm.use_error_term


@torch.no_grad()
def test_aliases_and_transcoders(llava) -> None:
    model, inputs, clean = llava
    aliased = sae_at("blocks.0.hook_out", 64)  # TransformerBridge's name for blocks.0.hook_resid_post
    with model.saes(saes=aliased):
        assert list(model.acts_to_saes) == [LLM_POINT]
    torch.manual_seed(0)
    transcoder = SAE(SAEConfig("transcoder", 64, 128, apply_b_dec_to_input=False, metadata={
        "hook_name": "blocks.1.hook_resid_mid", "hook_name_out": "blocks.1.hook_mlp_out"}))
    kept = model.run_with_saes(inputs, saes=[transcoder], use_error_term=True)
    torch.testing.assert_close(kept, clean, atol=1e-5, rtol=0)
    read = {}
    by_hand = model.run_with_hooks(inputs, fwd_hooks=[
        ("blocks.1.hook_resid_mid", lambda x, hook: read.__setitem__("x", x)),
        ("blocks.1.hook_mlp_out", lambda out, hook: transcoder(read["x"]))])
    assert torch.equal(model.run_with_saes(inputs, saes=[transcoder]), by_hand)


def test_bad_saes_are_refused_before_any_forward(llava) -> None:
    model, inputs, _ = llava
    fired = []
    model.add_hook("hook_embed", lambda x, hook: fired.append(hook.name), is_permanent=True)
    try:
        with pytest.raises(InputError, match="has d_in=48 but blocks.0.hook_resid_post is 64 wide"):
            model.run_with_saes(inputs, saes=[sae_at(LLM_POINT, 48)])
        with pytest.raises(InputError, match="d_in=64 but vision.blocks.0.hook_resid_post is 32 wide"):
            model.run_with_saes(inputs, saes=[sae_at(LLM_POINT, 64), sae_at(VISION_POINT, 64)])
        with pytest.raises(HookNameError, match="Closest"):
            model.run_with_saes(inputs, saes=[sae_at("blocks.0.hook_resid_postt", 64)])
        with pytest.raises(InputError, match="names no hook point"):
            model.run_with_saes(inputs, saes=[SAE(SAEConfig("standard", 64, 8))])
        with pytest.raises(InputError, match="load_sae converts a sae-lens SAE"):
            model.add_sae(torch.nn.Linear(64, 64))
        assert fired == [] and model.acts_to_saes == {}
    finally:
        model.reset_hooks(including_permanent=True)
    # a point whose width the config does not give is checked on its first activation
    with torch.no_grad(), pytest.raises(InputError, match="expects activations 5 wide"):
        model.run_with_saes(inputs, saes=[sae_at("blocks.0.mlp.hook_post", 5)])
    assert model.acts_to_saes == {} and not any(point.fwd_hooks for point in model.hook_dict.values())
