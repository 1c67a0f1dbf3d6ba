"""Multinomial logistic-regression probes fitted with full-batch L-BFGS in torch.

Features are standardised with training statistics (LLM activations have outlier dimensions),
then a softmax classifier with an L2 penalty is fitted. Every probe gets its own L-BFGS run:
stacking several probes into one run shares the line search and curvature history between them,
so a probe stopped at `max_iter` would depend on which other sites were fitted beside it. Fitting
them one by one costs the same here and makes each probe a function of its own data only.
Deterministic for fixed inputs.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .linear import LinearProbe

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
    """One probe per (features, labels) problem, each fitted on its own."""
    for x, y in problems:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} feature rows but {y.shape[0]} labels")
        if x.shape[0] == 0:
            raise ValueError("no training examples for the probe")
    return [_fit_one(x, y, n_classes, l2, max_iter, dtype) for x, y in problems]


def _fit_one(x, y, n_classes, l2, max_iter, dtype) -> LinearProbe:
    device = x.device
    x64 = x.to(torch.float64)
    mean, scale = x64.mean(0), x64.std(0).clamp(min=1e-6)
    z = ((x64 - mean) / scale).to(dtype)
    labels = y.to(device).long()
    weight = torch.zeros(x.shape[1], n_classes, dtype=dtype, device=device, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=dtype, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
        history_size=20, line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight + bias, labels) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearProbe(mean.float(), scale.float(), weight.detach().float(), bias.detach().float(), kind="logistic")
