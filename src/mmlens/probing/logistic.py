"""Multinomial logistic-regression probes fitted with full-batch L-BFGS in torch.

Features are standardised with training statistics (LLM activations have outlier dimensions),
then a softmax classifier with an L2 penalty is fitted. A sweep fits many small probes, so
`fit_logistic_many` stacks them (zero-padded to a common size, padded rows masked out of the
loss) and optimises their summed, separable objectives in one L-BFGS run: the per-iteration
overhead is paid once instead of once per site. Deterministic for fixed inputs.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .linear import LinearProbe

# Stacked problems are grouped so that one group's features stay under this many floats.
MAX_STACKED_ELEMENTS = 200_000_000


def fit_logistic(
    x: Float[Tensor, "n d"],
    y: Int[Tensor, "n"],
    n_classes: int,
    *,
    l2: float = 1e-3,
    max_iter: int = 100,
) -> LinearProbe:
    """Fit on (x, y); `l2` multiplies the squared weight norm added to the mean cross-entropy."""
    return fit_logistic_many([(x, y)], n_classes, l2=l2, max_iter=max_iter)[0]


def fit_logistic_many(
    problems: list[tuple[Float[Tensor, "n d"], Int[Tensor, "n"]]],
    n_classes: int,
    *,
    l2: float = 1e-3,
    max_iter: int = 100,
    dtype: torch.dtype = torch.float32,
) -> list[LinearProbe]:
    """One probe per (features, labels) problem, fitted together where memory allows."""
    for x, y in problems:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} feature rows but {y.shape[0]} labels")
        if x.shape[0] == 0:
            raise ValueError("no training examples for the probe")
    probes: list[LinearProbe | None] = [None] * len(problems)
    group: list[int] = []
    size = 0
    for i, (x, _) in enumerate(problems):
        if group and size + x.numel() > MAX_STACKED_ELEMENTS:
            _fit_group([problems[j] for j in group], group, probes, n_classes, l2, max_iter, dtype)
            group, size = [], 0
        group.append(i)
        size += x.numel()
    _fit_group([problems[j] for j in group], group, probes, n_classes, l2, max_iter, dtype)
    return probes  # type: ignore[return-value]


def _fit_group(problems, where, out, n_classes, l2, max_iter, dtype) -> None:
    device = problems[0][0].device
    n_max = max(x.shape[0] for x, _ in problems)
    d_max = max(x.shape[1] for x, _ in problems)
    s = len(problems)
    z = torch.zeros(s, n_max, d_max, dtype=dtype, device=device)
    labels = torch.zeros(s, n_max, dtype=torch.long, device=device)
    row_weight = torch.zeros(s, n_max, dtype=dtype, device=device)
    stats = []
    for k, (x, y) in enumerate(problems):
        x64 = x.to(device, torch.float64)
        mean, scale = x64.mean(0), x64.std(0).clamp(min=1e-6)
        stats.append((mean, scale))
        n, d = x.shape
        z[k, :n, :d] = ((x64 - mean) / scale).to(dtype)
        labels[k, :n] = y.to(device).long()
        row_weight[k, :n] = 1.0 / n  # each problem's loss is its own mean
    weight = torch.zeros(s, d_max, n_classes, dtype=dtype, device=device, requires_grad=True)
    bias = torch.zeros(s, 1, n_classes, dtype=dtype, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
        history_size=20, line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        logits = torch.bmm(z, weight) + bias
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        loss = (ce * row_weight.flatten()).sum() + l2 * (weight**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    for k, (x, _) in enumerate(problems):
        mean, scale = stats[k]
        d = x.shape[1]
        out[where[k]] = LinearProbe(mean.float(), scale.float(), weight[k, :d].detach().float(),
                                    bias[k, 0].detach().float(), kind="logistic")
