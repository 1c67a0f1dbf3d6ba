"""Half precision: every analysis on the embedded model in bfloat16 against float32, on CPU.

bfloat16 keeps 8 significant bits, so activations differ from float32 by about 0.3-0.6% (relative
norm, measured on tiny-shapes-llava); statistics are accumulated in float64 (ridge) or float32
(logistic features, metrics, logit differences), so what remains is that rounding of the model
itself. Tolerances below are stated against the measured gaps (in the comments).
"""

from __future__ import annotations

import pytest
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.experiments import anchor_knockout
from mmlens.interventions.corruptions import recovery_blocked
from mmlens.interventions.patching import Run, head_sweep
from mmlens.interventions.patching_metrics import logit_difference
from mmlens.probing import probe_sweep

SITES = ["vision.blocks.1.hook_resid_post", "adapter.hook_out", "blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]


@pytest.fixture(scope="module")
def models():
    torch.set_grad_enabled(False)
    yield {dtype: HookedMLLM.from_pretrained("tiny-shapes-llava", dtype=dtype) for dtype in ("float32", "bfloat16")}
    torch.set_grad_enabled(True)


@pytest.fixture(scope="module")
def scenes():
    return load_segmentation("scenes", split="validation", n=48, seed=0)


@pytest.fixture(scope="module")
def sweeps(models, scenes):
    return {dtype: probe_sweep(model, scenes, sites=SITES, probe="ridge", progress=False, alpha=1e-2)
            for dtype, model in models.items()}


def test_the_model_really_runs_in_bfloat16(models, scenes):
    model = models["bfloat16"]
    assert {p.dtype for p in model.hf_model.parameters()} == {torch.bfloat16}
    inputs = model.prepare(scenes[[0, 1]]["image"], "")
    assert inputs.pixel_values.dtype == torch.bfloat16
    _, cache = model.run_with_cache(inputs, names_filter=SITES)
    assert all(cache[name].dtype == torch.bfloat16 for name in SITES)


def test_probe_sweep_in_bfloat16_matches_float32(models, scenes, sweeps):
    full, half = (sweeps[d].table.set_index("hook").miou for d in ("float32", "bfloat16"))
    # ridge statistics are float64 sums either way: measured gap 0.0006 mIoU (one site), 0 at the others
    assert (full - half).abs().max() <= 0.01
    assert sweeps["bfloat16"].probes[("model", "adapter.hook_out")].weight.dtype == torch.float32
    logistic = {d: probe_sweep(models[d], scenes, sites=SITES[1:3], probe="logistic", progress=False, n_boot=1000,
                               max_iter=30).table.set_index("hook").miou for d in models}
    # L-BFGS stopped at 30 iterations amplifies the rounding: measured gap 0.016 mIoU
    assert (logistic["float32"] - logistic["bfloat16"]).abs().max() <= 0.04


def test_anchor_knockout_effect_in_bfloat16_matches_float32(models, sweeps):
    # the same probes (the float32 sweep's) read both models, so only the model's precision differs
    effects = {d: anchor_knockout(models[d], sweeps["float32"], n_control=1, n_boot=1000).effects for d in models}
    full, half = effects["float32"], effects["bfloat16"]
    assert list(full.comparison) == list(half.comparison) and list(full.hook) == list(half.hook)
    gap = (full.effect - half.effect).abs()
    # mIoU effects: measured gap 0.005. Target accuracy counts a few dozen target tokens, so one token
    # flipping by rounding moves it by 1/62 = 0.016 (measured 0.032, two tokens): allow three tokens
    assert gap[full.metric != "target_accuracy"].max() <= 0.01
    assert gap[full.metric == "target_accuracy"].max() <= 0.05
    assert full.effect.abs().max() > 0.02, "the knockout must do something for the comparison to mean anything"


def test_head_sweep_in_bfloat16_matches_float32(models, scenes):
    values = {}
    for dtype, model in models.items():
        inputs = model.prepare(scenes[[0, 1, 2]]["image"], "what is in the image ?")
        values[dtype] = head_sweep(model, Run(inputs), recovery_blocked(model, inputs), logit_difference(5, 7))
    full, half = values["float32"], values["bfloat16"]
    assert half.dtype == torch.float32  # the metric is taken in float32 from bfloat16 logits
    # bfloat16 logits of a few units are rounded in steps of about 0.03: measured gap 0.026 where the
    # heads spread the metric over 0.12
    assert (full - full.mean()).abs().max() > 0.1
    assert (full - half).abs().max() <= 0.05
