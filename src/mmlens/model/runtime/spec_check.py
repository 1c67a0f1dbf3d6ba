"""Checking at load time that every hooked block computes what the Hugging Face block computes.

A hooked block runs Hugging Face's own code while no hook listens and its spec's step-by-step
maths when one does, so a spec that does not match the block (a missed sandwich norm, a wrong
rotary function or scale) leaves plain logits exact and hooked activations wrong. The check runs
the architecture's probe batch twice, bare and with an identity hook on every hook point, records
each block's output both times, and names the first block whose outputs differ. A bare run that
is already NaN is no spec's fault: it names the parameters holding NaN or inf instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ModelLoadError, UnsupportedModelError

# `model` below is a HookedMLLM, which calls this module while it is being built.

# Largest difference, relative to the block output's scale, two runs of the same maths may show
# (eager vs Hugging Face's fused kernels reorder float sums).
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 3e-2, torch.bfloat16: 3e-2}


def _first_tensor(output) -> Tensor:
    return output if isinstance(output, Tensor) else output[0]


@torch.no_grad()
def _block_outputs(model: Any, inputs: dict[str, Tensor], blocks: list[tuple[str, nn.Module]],
                   running: list[str] | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """Each block's output and the logits; `running` keeps the name of a block whose forward raised."""
    outputs: dict[str, Tensor] = {}
    running = [] if running is None else running

    def finished(name: str, out: Any) -> None:
        running.remove(name)
        outputs[name] = _first_tensor(out).detach().clone()

    handles = [module.register_forward_pre_hook(lambda _m, _a, name=name: running.append(name)) for name, module in blocks]
    handles += [module.register_forward_hook(lambda _m, _a, out, name=name: finished(name, out)) for name, module in blocks]
    try:
        logits = model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, logits


def _non_finite_error(model: Any) -> ModelLoadError:
    """Why the bare model gives NaN or inf on a probe batch: the parameters that hold non-finite
    values (a damaged file), or, if none does, a dtype too narrow for its activations."""
    cfg = model.cfg
    damaged = []
    for name, parameter in model.hf_model.named_parameters():
        if parameter.is_floating_point() and parameter.device.type != "meta":  # meta: offloaded, read at run time
            count = int((~torch.isfinite(parameter.detach())).sum())
            if count:
                damaged.append(f"{name} ({count} of {parameter.numel()} values)")
    if damaged:
        shown = ", ".join(damaged[:5]) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
        return ModelLoadError(
            f"{cfg.architecture}: {len(damaged)} parameter(s) hold NaN or inf: {shown}. Every output would be NaN; "
            "the checkpoint file may be damaged (an interrupted download or copy?): copy it again, or check the code "
            "that edited those weights"
        )
    return ModelLoadError(
        f"{cfg.architecture}: every weight is finite but a probe batch gives NaN or inf logits in {cfg.dtype}: its "
        "activations overflow this dtype. Load the model in a wider dtype (bfloat16 or float32)"
    )


def verify_blocks(model: Any) -> float:
    """Raise `UnsupportedModelError` naming the first block whose hooked maths differs from the
    bare block on the probe batch; return the largest relative difference seen (logits included)."""
    architecture, cfg = model.architecture, model.cfg
    probe = {k: v.to(cfg.device) for k, v in architecture.probe_inputs(cfg).items()}
    probe["pixel_values"] = probe["pixel_values"].to(cfg.dtype)
    blocks = architecture.blocks(model.hf_model)
    tolerance = RELATIVE_TOLERANCE.get(cfg.dtype, 3e-2)
    bare, bare_logits = _block_outputs(model, probe, blocks)
    if not torch.isfinite(bare_logits).all():
        raise _non_finite_error(model)
    use_result, running = cfg.use_attn_result, []
    model.set_use_attn_result(True)
    try:
        with model.hooks(fwd_hooks=[(lambda _name: True, lambda x, hook: x)]):
            hooked, hooked_logits = _block_outputs(model, probe, blocks, running)
    except RuntimeError as error:  # the spec's maths does not even run on this block's tensors
        where = f"{running[-1]} ({type(dict(blocks)[running[-1]]).__name__})" if running else "a module outside the blocks"
        raise UnsupportedModelError(
            f"{cfg.architecture}: with hooks active the forward fails in {where} ({error}); it does not match its "
            "block spec (rotary tables, head layout). Fix the spec, or pass verify=False to inspect the model anyway."
        ) from error
    finally:
        model.set_use_attn_result(use_result)
    worst = 0.0
    for name, _ in blocks:
        a, b = bare[name], hooked[name]
        scale = float(a.abs().max().clamp(min=1e-6))
        difference = float((a - b).abs().max()) / scale
        worst = max(worst, difference)
        if not difference <= tolerance:
            raise UnsupportedModelError(
                f"{cfg.architecture}: {name} ({type(dict(blocks)[name]).__name__}) does not match its block spec: "
                f"with hooks active its output differs from Hugging Face's by {difference:.3g} (relative; "
                f"tolerance {tolerance:g}). The architecture file's BlockSpec misses something this block "
                "does (norm placement, q/k norms, rotary function, scaling, layer scale); hooked activations "
                "would be wrong. Fix the spec, or pass verify=False to inspect the model anyway."
            )
    logit_difference = float((bare_logits - hooked_logits).abs().max()) / float(bare_logits.abs().max().clamp(min=1e-6))
    if not logit_difference <= tolerance:
        raise UnsupportedModelError(
            f"{cfg.architecture}: every block matches its spec but the logits differ by {logit_difference:.3g} "
            "(relative) with hooks active: a hooked module outside the blocks (embeddings, adapter, final "
            "norm) computes something else than Hugging Face's"
        )
    return max(worst, logit_difference)
