"""Backward hooks fire at every hook point whose value reaches the loss, with autograd's gradient.

Each family runs once with every point edited to `value + delta` (`delta` a zero tensor that
requires grad) and a backward hook on every point: after `loss.backward()`, `delta.grad` is the
loss's gradient with respect to what the forward reads at that point. A point whose delta gets no
gradient must be among the points the family lists as off the loss's path, each with its reason;
every other point's backward hook must fire, with that gradient.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from mmlens import HookedMLLM
from mmlens.errors import HookReturnError
from mmlens import testing_families as families
from mmlens.testing import tiny_llava

from conftest import random_images

PROMPTS = ["what is in the image ?", "how many", "the colour of the left shape is ?"]

BUILDERS = {
    "llava": lambda: tiny_llava(llm_kv_heads=2),
    "llava-siglip": lambda: tiny_llava(vision="siglip", vision_feature_layer=-1),
    "llava-mistral": lambda: families.tiny_llava_with("mistral"),
    "llava-qwen2": lambda: families.tiny_llava_with("qwen2"),
    "llava-dinov2": lambda: families.tiny_llava_dinov2(swiglu=True, registers=2),
    "llava-next": families.tiny_llava_next,
    "llava-onevision": families.tiny_llava_onevision,
    "paligemma": families.tiny_paligemma,
    "gemma3": families.tiny_gemma3,
    "idefics3": lambda: families.tiny_idefics3("idefics3"),
    "smolvlm": lambda: families.tiny_idefics3("smolvlm"),
    "qwen2-vl": lambda: families.tiny_qwen2_vl("2"),
    "qwen2.5-vl": lambda: families.tiny_qwen2_vl("2.5"),
    "qwen3-vl": families.tiny_qwen3_vl,
    "internvl3": lambda: families.tiny_internvl("internvl3"),
    "internvit6b": lambda: families.tiny_internvl("internvit6b"),
    "mistral3": families.tiny_mistral3,
}
# LLaVA's projector reads a hidden state of the tower (`vision_feature_layer`); Hugging Face still
# runs the tower's final norm, whose output nothing reads
FINAL_NORM_UNREAD = {"llava", "llava-siglip", "llava-mistral", "llava-qwen2", "llava-dinov2", "llava-next",
                     "llava-onevision"}


def off_the_loss_path(family: str, model: HookedMLLM) -> dict[str, str]:
    """The family's hook points whose value cannot reach the logits, each with the reason."""
    read = max(model.cfg.adapter.feature_layers)  # hidden state j leaves vision block j - 1
    off = {}
    for name in model.hook_names("vision"):
        block = re.match(r"vision\.blocks\.(\d+)\.", name)
        if block and int(block[1]) >= read:
            off[name] = f"vision block {block[1]} runs after hidden state {read}, the one the projector reads"
        elif name.startswith("vision.ln_post.") and family in FINAL_NORM_UNREAD:
            off[name] = "the projector reads a hidden state of the tower, not its final norm"
    return off


@dataclass
class GradientRun:
    family: str
    model: HookedMLLM
    inputs: object
    autograd: dict[str, Tensor | None]  # delta.grad per point: None where the value never reaches the loss
    fired: dict[str, Tensor]  # what each point's backward hook received


def run_with_deltas(family: str) -> GradientRun:
    hf_model, processor = BUILDERS[family]()
    processor.tokenizer.padding_side = "left"
    model = HookedMLLM.from_hf(hf_model, processor)
    inputs = model.prepare(random_images(3), PROMPTS)
    model.set_use_attn_result(True)
    deltas: dict[str, Tensor] = {}
    fired: dict[str, Tensor] = {}

    def plus_delta(value: Tensor, hook) -> Tensor:
        deltas[hook.name] = torch.zeros_like(value, requires_grad=True)
        return value + deltas[hook.name]

    def record(grad: Tensor, hook) -> None:
        assert hook.name not in fired, f"{hook.name}'s backward hook fired twice"
        fired[hook.name] = grad.detach().clone()

    try:
        loss = model.run_with_hooks(inputs, return_type="loss", fwd_hooks=[(lambda name: True, plus_delta)],
                                    bwd_hooks=[(lambda name: True, record)], reset_hooks_end=False)
        loss.backward()
    finally:
        model.reset_hooks()
    model.zero_grad(set_to_none=True)
    assert set(deltas) == set(model.hook_names()), "every point fires forward"
    autograd = {name: d.grad if d.grad is not None and d.grad.abs().max() > 0 else None for name, d in deltas.items()}
    return GradientRun(family, model, inputs, autograd, fired)


@pytest.fixture(scope="module", params=list(BUILDERS))
def run(request) -> GradientRun:
    return run_with_deltas(request.param)


def test_backward_hooks_fire_exactly_where_the_value_reaches_the_loss(run):
    off = off_the_loss_path(run.family, run.model)
    unreached = {name for name, grad in run.autograd.items() if grad is None}
    assert unreached == set(off), (f"reach the loss though listed off it: {sorted(set(off) - unreached)}; "
                                   f"never reach it, with no reason listed: {sorted(unreached - set(off))}")
    on_path = set(run.model.hook_names()) - set(off)
    assert set(run.fired) == on_path, f"no backward hook fired at {sorted(on_path - set(run.fired))}"
    assert any(name.endswith("hook_scale") for name in run.fired)


def test_backward_hooks_receive_autograds_gradient(run):
    for name, grad in run.autograd.items():
        if grad is not None:
            assert name in run.fired, f"{name} reaches the loss but its backward hook never fired"
            torch.testing.assert_close(run.fired[name], grad, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_gradient_cache_holds_every_point_on_the_path(run):
    model = run.model
    model.set_use_attn_result(True)
    loss, cache = model.run_with_cache(run.inputs, incl_bwd=True, return_type="loss")
    model.zero_grad(set_to_none=True)
    on_path = set(model.hook_names()) - set(off_the_loss_path(run.family, model))
    assert {name for name in cache.keys() if name.endswith("_grad")} == {name + "_grad" for name in on_path}
    for name in on_path:
        expected = run.autograd[name]
        torch.testing.assert_close(cache[name + "_grad"], expected, rtol=1e-4,
                                   atol=1e-5 * expected.abs().max().item(), msg=lambda m: f"{name}: {m}")
    # TransformerLens's norm: out = w * x / scale (+ b), so dL/dscale = -sum(dL/dout * (out - b)) / scale
    assert model.cfg.llm.normalization_type == "RMS", "the LLM's norms have no b"
    for name in on_path:
        if name.endswith("hook_scale") and not name.startswith("vision."):
            normalized = name.replace("hook_scale", "hook_normalized")
            by_formula = -(cache[normalized + "_grad"] * cache[normalized]).sum(-1, keepdim=True) / cache[name]
            torch.testing.assert_close(cache[name + "_grad"], by_formula, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name}: {m}")


def test_the_gradient_at_the_final_scale_predicts_an_edit_there():
    """The issue's case: an edit of `ln_final.hook_scale` moves the logits, so its backward hook
    must fire, with the gradient a finite difference of that edit measures."""
    hf_model, processor = tiny_llava()
    model = HookedMLLM.from_hf(hf_model, processor)
    inputs = model.prepare(random_images(2), PROMPTS[:2])
    received = []
    model.add_hook("ln_final.hook_scale", lambda grad, hook: received.append(grad), "bwd")
    scales = []
    model.add_hook("ln_final.hook_scale", lambda scale, hook: scales.append(scale.detach()))
    model(inputs, return_type="loss").backward()
    model.reset_hooks()
    assert len(received) == 1, "the backward hook on ln_final.hook_scale fired"
    step = 1e-2  # central difference: float32 rounding and the step's square both stay under 1%
    with torch.no_grad():
        up, down = (model.run_with_hooks(inputs, return_type="loss",
                                         fwd_hooks=[("ln_final.hook_scale", lambda s, hook, f=f: s * f)])
                    for f in (1 + step, 1 - step))
    finite_difference = (up - down) / (2 * step)  # d loss / d (relative change of every scale)
    assert abs(finite_difference) > 1e-3
    torch.testing.assert_close((received[0] * scales[0]).sum(), finite_difference, rtol=1e-2, atol=0)


def test_a_backward_hook_returning_another_gradient_shape_is_refused_by_name(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs

    def first_row_only(grad, hook):
        return grad[:1]

    try:
        with model.hooks(bwd_hooks=[("blocks.0.hook_resid_mid", first_row_only)]):
            loss = model(inputs, return_type="loss")
            refusal = r"backward hook .*first_row_only at blocks.0.hook_resid_mid received a gradient of shape \(3, "
            with pytest.raises(HookReturnError, match=refusal):
                loss.backward()
        zeroed = []  # a gradient like the one received (also as TransformerLens's `(grad,)`) replaces it upstream
        with model.hooks(bwd_hooks=[("blocks.0.hook_resid_mid", lambda grad, hook: (torch.zeros_like(grad),)),
                                    ("blocks.0.hook_resid_pre", lambda grad, hook: zeroed.append(grad))]):
            model(inputs, return_type="loss").backward()
        assert len(zeroed) == 1 and zeroed[0].abs().max() == 0
    finally:
        model.zero_grad(set_to_none=True)
