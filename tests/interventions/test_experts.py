"""Expert interventions (`mmlens.interventions.experts`) on a tiny Qwen3-VL-MoE: the expert sweep
against patching by hand, an ablation as a run's edit inside patching, and the inputs refused.
(Ablation against Hugging Face edited by hand: tests/model/test_moe_hooks.py.)"""

from __future__ import annotations

import pytest
import torch
from PIL import ImageOps

from mmlens import HookedMLLM
from mmlens.errors import InputError
from mmlens.interventions import (Patch, Run, TokenGroup, ablate_experts, expert_sweep, logit_difference,
                                  patch_conditions)
from mmlens.model.hook_names import parse_hook_name
from mmlens.testing.families.qwen3_vl import tiny_qwen3_vl
from mmlens.testing.families.qwen3_vl_moe import tiny_qwen3_vl_moe

from conftest import random_images

PROMPTS = ["what is in the image ?", "how many", "the colour of the left shape is ?"]
N_EXPERTS, MOE_LAYERS = 4, (1, 2)
METRIC = logit_difference(answer=5, wrong=6)


@pytest.fixture(scope="module")
def runs():
    model = HookedMLLM.from_hf(*tiny_qwen3_vl_moe())
    images = random_images(3)
    clean = model.prepare(images, PROMPTS)
    corrupt = model.prepare([ImageOps.mirror(im) for im in images], PROMPTS)  # same sizes, same layout
    return model, clean, corrupt


@torch.no_grad()
def test_expert_sweep_equals_patching_one_expert_at_a_time(runs):
    """`expert_sweep` (clean -> corrupted) gives, for every MoE layer and expert, the metric of the
    corrupted run with that expert's contribution at the image tokens replaced by the clean one."""
    model, clean, corrupt = runs
    swept = expert_sweep(model, clean, corrupt, METRIC, positions=TokenGroup.image())
    assert swept.shape == (len(MOE_LAYERS), N_EXPERTS, 3)
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_out") and ".experts." in n)
    image = TokenGroup.image().resolve(corrupt)[..., None].to(model.cfg.device)
    for i, layer in enumerate(MOE_LAYERS):
        for e in range(N_EXPERTS):
            name = f"blocks.{layer}.mlp.experts.{e}.hook_out"
            assert parse_hook_name(name).expert == e
            logits = model.run_with_hooks(corrupt, fwd_hooks=[(name, lambda x, hook: torch.where(image, cache[hook.name], x))])
            torch.testing.assert_close(swept[i, e], METRIC({"logits": logits}, corrupt), atol=1e-5, rtol=0)
    assert swept.std() > 1e-5, "experts differ in what they restore"


@torch.no_grad()
def test_an_ablation_is_a_runs_edit_in_patching(runs):
    """An expert ablation as the target run's edit applies to every repeated copy patching makes:
    patching the residual from the unablated run into the ablated one at every position restores
    the unablated metric, and patching nothing leaves the ablated one."""
    model, clean, _ = runs
    ablated = Run(clean, edit=lambda inputs: ablate_experts(model, inputs, {1: [0, 1], 2: [3]}))
    with ablate_experts(model, clean, {1: [0, 1], 2: [3]}):
        by_hand = METRIC({"logits": model(clean)}, clean)
    restored, untouched = patch_conditions(model, clean, ablated, METRIC, [
        Patch("blocks.2.hook_resid_post"), Patch("blocks.0.hook_resid_post", TokenGroup.last() - TokenGroup.last())])
    torch.testing.assert_close(untouched, by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(restored, METRIC({"logits": model(clean)}, clean), atol=1e-5, rtol=0)
    assert (by_hand - restored).abs().max() > 1e-4, "the ablation changed the metric"


def test_expert_ablation_refuses_what_it_cannot_do(runs):
    """Renormalising after ablating every expert a token chose leaves no weight (refused); dense
    layers, experts out of range, empty positions and a model without experts are named."""
    model, clean, _ = runs
    everything = ablate_experts(model, clean, {1: range(N_EXPERTS)}, renormalize=True)
    with pytest.raises(InputError, match="no weight is left to renormalise"):
        model.run_with_hooks(clean, fwd_hooks=everything.hooks)
    with pytest.raises(InputError, match=r"layers \[0\] are not mixture-of-experts blocks; .* \[1, 2\]"):
        ablate_experts(model, clean, {0: [1]})
    with pytest.raises(InputError, match=r"experts \[4\] out of range"):
        ablate_experts(model, clean, {1: [4]})
    with pytest.raises(InputError, match="select no token"):
        ablate_experts(model, clean, {1: [0]}, positions=TokenGroup.last() - TokenGroup.last())
    dense = HookedMLLM.from_hf(*tiny_qwen3_vl())
    with pytest.raises(InputError, match="has no mixture-of-experts blocks"):
        expert_sweep(dense, clean, clean, METRIC)
