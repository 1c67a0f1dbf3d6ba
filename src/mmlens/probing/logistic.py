"""Multinomial logistic-regression probes fitted with full-batch L-BFGS in torch.

Features are standardised with training statistics (LLM activations have outlier dimensions),
then a softmax classifier with an L2 penalty is fitted to convergence. Deterministic for fixed
inputs, and fast for the token counts of a probe sweep (no scikit-learn at run time).
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
    """Fit on (x, y); `l2` multiplies the mean squared weight norm added to the mean loss."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} feature rows but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("no training examples for the probe")
    x = x.double()
    mean = x.mean(0)
    scale = x.std(0).clamp(min=1e-6)
    z = (x - mean) / scale
    weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
        history_size=20, line_search_fn="strong_wolfe",
    )
    y = y.long()

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight + bias, y) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearProbe(mean.float(), scale.float(), weight.detach().float(), bias.detach().float(), kind="logistic")
