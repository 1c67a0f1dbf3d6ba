"""`fire` calls a point's forward hooks itself, as nn.Module.__call__ would on the identity
module, and leaves everything else (backward and pre-hooks, global hooks) to the module call."""

from __future__ import annotations

import torch
from torch.nn.modules.module import register_module_forward_hook

from mmlens.model.hook_contract import CheckedHookPoint
from mmlens.model.hook_tree import fire, untouched, version_of


def _point() -> CheckedHookPoint:
    point = CheckedHookPoint()
    point.name = "blocks.0.hook_resid_pre"
    return point


def _fired_both_ways(point: CheckedHookPoint, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return fire(point, x.clone()), point(x.clone())


def test_forward_hooks_chain_in_order_as_the_module_call_does():
    point, calls = _point(), []
    point.add_hook(lambda x, hook: calls.append(("tl", x.sum().item())) or x * 2)
    point.register_forward_hook(lambda module, args, out: calls.append(("torch", out.sum().item())) or out + 1)
    point.register_forward_hook(lambda module, args, kwargs, out: calls.append(("kwargs", args[0].sum().item())),
                                with_kwargs=True)
    x = torch.ones(2, 3)
    fired, called = _fired_both_ways(point, x)
    assert torch.equal(fired, called) and torch.equal(fired, x * 2 + 1)
    # each hook saw what the one before it returned, and the kwargs hook the original input
    assert calls[:3] == calls[3:] == [("tl", 6.0), ("torch", 12.0), ("kwargs", 6.0)]


def test_a_point_without_hooks_returns_its_input_itself():
    x = torch.ones(2)
    assert fire(_point(), x) is x


def test_pre_hooks_and_global_hooks_take_the_module_call():
    point = _point()
    point.add_hook(lambda x, hook: x + 1)
    point.register_forward_pre_hook(lambda module, args: (args[0] * 10,))
    x = torch.ones(2)
    assert torch.equal(fire(point, x), torch.full((2,), 11.0))

    point = _point()
    point.add_hook(lambda x, hook: x + 1)
    handle = register_module_forward_hook(lambda module, args, out: out * 3 if module is point else None)
    try:
        assert torch.equal(fire(point, x), torch.full((2,), 4.0))  # global hooks run first, then the point's
    finally:
        handle.remove()


def test_untouched_sees_in_place_edits_and_replacements():
    x = torch.ones(3)
    version = version_of(x)
    assert untouched(x, x, version)
    assert not untouched(x, x.clone(), version)
    x[0] = 2.0
    assert not untouched(x, x, version)
    with torch.inference_mode():
        y = torch.ones(3)
    assert version_of(y) is None and not untouched(y, y, version_of(y))


def test_norm_scale_edits_count_however_they_are_made(tiny_clip):
    """A norm whose `hook_scale` hooks only read skips the rescale; an edit made in place, through
    `.data` (which moves no version counter) or returned moves the output alike, and a reading
    hook still receives the loss's gradient."""
    model, inputs = tiny_clip.model, tiny_clip.inputs
    name = "blocks.0.ln1.hook_scale"

    def edit(s):
        s[:, 0] = s[:, 0] * 2

    hooks = {
        "in place": lambda s, hook: edit(s),
        "through .data": lambda s, hook: edit(s.data),
        "returned": lambda s, hook: (lambda c: (edit(c), c)[1])(s.clone()),
    }
    with torch.no_grad():
        base = model(inputs)
        outs = {how: model.run_with_hooks(inputs, fwd_hooks=[(name, hook)]) for how, hook in hooks.items()}
        read = model.run_with_hooks(inputs, fwd_hooks=[(name, lambda s, hook: None)])
    assert torch.equal(read, base)
    assert all(torch.equal(out, outs["returned"]) for out in outs.values())
    assert (outs["returned"] - base).abs().max() > 1e-4

    seen = {}

    def keep(s, hook):
        s.retain_grad()
        seen["s"] = s

    model.run_with_hooks(inputs, fwd_hooks=[(name, keep)]).sum().backward()
    model.zero_grad(set_to_none=True)
    assert seen["s"].grad is not None and seen["s"].grad.abs().sum() > 0
