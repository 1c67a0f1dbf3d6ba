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
from tqdm.auto import tqdm

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
    progress: bool = False,
    names: list[str] | None = None,
) -> list[LinearProbe]:
    """One probe per (features, labels) problem, each fitted on its own. With `progress`, a bar
    counts fitted probes and names the one being fitted (`names`) with its L-BFGS evaluations."""
    for x, y in problems:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} feature rows but {y.shape[0]} labels")
        if x.shape[0] == 0:
            raise ValueError("no training examples for the probe")
    names = names or [f"probe {i}" for i in range(len(problems))]
    # miniters=0: update(0) redraws whenever mininterval has passed, so evaluations show mid-fit
    bar = tqdm(total=len(problems), desc="fitting probes", unit="probe", disable=not progress, leave=False, miniters=0)
    probes = []
    for (x, y), name in zip(problems, names):

        def report(evaluations: int, name: str = name) -> None:
            # a long fit keeps the screen moving: update(0) redraws at most every mininterval
            bar.set_postfix_str(f"{name}, L-BFGS evaluation {evaluations}", refresh=False)
            bar.update(0)

        probes.append(_fit_one(x, y, n_classes, l2, max_iter, dtype, report if progress else None))
        bar.update(1)
    bar.close()
    return probes


def _fit_one(x, y, n_classes, l2, max_iter, dtype, report=None) -> LinearProbe:
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

    evaluations = 0

    def closure():
        nonlocal evaluations
        evaluations += 1
        if report is not None:
            report(evaluations)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight + bias, labels) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearProbe(mean.float(), scale.float(), weight.detach().float(), bias.detach().float(), kind="logistic")
