"""Attribution patching: a first-order estimate of every head's patching effect in one backward.

Patching head h at position p from source into target changes the metric by about
(a_source - a_target) . d metric / d a_target, the activation difference times the gradient of
the metric in the target run. One forward of the source (activations cached), one forward and
one backward of the target give this for all layers, heads and positions at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..model import HookedMLLM, MultimodalInputs
from .groups import GroupContext, TokenGroup
from .patching import Metric, Run, as_run, check_same_layout, evaluate, head_conditions, metric_hooks, run_and_collect


@dataclass
class Attribution:
    """Estimated effect of patching each head at each position; `source_metric` and
    `target_metric` are the unpatched runs' values per row."""

    values: Float[Tensor, "layer batch seq head"]
    layers: list[int]
    hook: str
    source_metric: Float[Tensor, "batch"]
    target_metric: Float[Tensor, "batch"]

    def per_head(self, positions: Bool[Tensor, "batch seq"] | None = None) -> Float[Tensor, "layer head batch"]:
        """Summed over positions (all, or those marked): the estimate for patching a head there."""
        values = self.values
        if positions is not None:
            values = torch.where(positions.to(values.device)[None, :, :, None], values, 0.0)
        return values.sum(2).permute(0, 2, 1)


def attribution_patching(
    model: HookedMLLM,
    source: Run | MultimodalInputs,
    target: Run | MultimodalInputs,
    metric: Metric,
    *,
    hook: str = "z",
    layers: Sequence[int] | None = None,
) -> Attribution:
    """Gradient x activation difference at `attn.hook_{hook}` of every LLM layer (or `layers`),
    per row, position and head, from one source forward and one target forward + backward.
    The metric must be differentiable (a probe margin, a logit difference; not an accuracy)."""
    source, target = as_run(source, "source"), as_run(target, "target")
    check_same_layout(source.inputs, target.inputs)
    layers, _ = head_conditions(model, hook, layers)
    names = [f"blocks.{l}.attn.hook_{hook}" for l in layers]
    with torch.no_grad():
        clean = run_and_collect(model, source, [*names, *metric_hooks(metric)])
    source_metric = evaluate(metric, clean, source.inputs)

    def into_graph(x: Tensor, hook) -> Tensor | None:
        # frozen parameters leave the run outside autograd: start the graph at the LLM's input
        return x.detach().requires_grad_() if not x.requires_grad else None

    with torch.enable_grad():
        found = run_and_collect(model, target, [*names, *metric_hooks(metric)], detach=False,
                                extra_hooks=[("blocks.0.hook_resid_pre", into_graph)])
        values = evaluate(metric, found, target.inputs)
        if not values.requires_grad:
            raise ValueError("the metric has no gradient with respect to the activations (an accuracy is a step "
                             "function); use a differentiable metric such as the probe margin")
        grads = torch.autograd.grad(values.nansum(), [found[n] for n in names], allow_unused=True)
    out = []
    for name, grad in zip(names, grads):
        grad = torch.zeros_like(found[name]) if grad is None else grad
        # summed over d_head in float32: in half precision the sum of many small products loses them
        out.append(((clean[name].float() - found[name].detach().float()) * grad.float()).sum(-1))
    return Attribution(torch.stack(out).detach(), layers, hook, source_metric.detach(), values.detach())


def rank_correlation(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Spearman rank correlation of two equally shaped arrays (flattened)."""
    a, b = np.asarray(torch.as_tensor(a).cpu()).ravel(), np.asarray(torch.as_tensor(b).cpu()).ravel()
    if a.shape != b.shape:
        raise ValueError(f"cannot correlate {a.shape} with {b.shape}")
    return float(pd.Series(a).corr(pd.Series(b), method="spearman"))


def positions_mask(inputs: MultimodalInputs, positions: TokenGroup | Tensor | None,
                   context: GroupContext | None = None) -> Bool[Tensor, "batch seq"] | None:
    """A TokenGroup (or mask) as the [batch, seq] mask `Attribution.per_head` takes."""
    if positions is None or isinstance(positions, Tensor):
        return positions
    return positions.resolve(inputs, context)
