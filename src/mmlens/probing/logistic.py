"""Multinomial logistic-regression probes fitted with full-batch L-BFGS in torch, in bounded memory.

Features are standardised with training statistics (LLM activations have outlier dimensions),
then a softmax classifier with an L2 penalty is fitted. The loss and its gradient are sums over
training tokens, so they are computed chunk by chunk from wherever the features live (a tensor, or
the float16 store on disk): memory is one chunk, set by `memory_mb`, whatever the number of
images, tokens or sites. The sums are accumulated in float64 and, given a process group, added
over ranks, so every rank takes the same L-BFGS steps on the whole training set: the probe does
not depend on how the tokens are split over chunks or processes beyond float rounding.
Fits run to L-BFGS's convergence tolerances (not an iteration cap), in the `dtype` asked for (the
sweep asks for float64: float32 steps stall at points that move with the last bits of the
features), so a probe is the optimum of its problem up to those tolerances, whatever the batch
size or thread count that produced its features. Every probe gets its own L-BFGS run: stacking several probes into one run shares the line search
and curvature history between them, so a probe stopped at `max_iter` would depend on which other
sites were fitted beside it. Deterministic for fixed inputs.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor
from ..progress import progress_bar

from .. import distributed
from .linear import LinearProbe

DEFAULT_MEMORY_MB = 1024.0
from ..defaults import MAX_ITER  # noqa: E402  (a guard only: fits stop at their tolerances)


class Features(Protocol):
    """Training tokens of one probe, readable in chunks of at most `rows` tokens."""

    n: int
    d: int

    def chunks(self, rows: int) -> Iterator[tuple[Float[Tensor, "m d"], Int[Tensor, "m"]]]: ...


class TensorFeatures:
    """Features already in memory."""

    def __init__(self, x: Float[Tensor, "n d"], y: Int[Tensor, "n"]):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} feature rows but {y.shape[0]} labels")
        self.x, self.y, self.n, self.d = x, y, x.shape[0], x.shape[1]

    def chunks(self, rows: int):
        for start in range(0, self.n, rows):
            yield self.x[start : start + rows], self.y[start : start + rows]


def chunk_rows(d: int, n_classes: int, memory_mb: float, itemsize: int = 4) -> int:
    """Tokens per chunk so that a chunk's features (read as float32), standardised copy, logits and
    probabilities (`itemsize` bytes each: 8 when the fit runs in float64) fit in `memory_mb` (the
    float64 sums are d x n_classes, counted apart)."""
    return max(1, int(memory_mb * 2**20 / (4 * d + itemsize * (d + 2 * n_classes) + 8)))


def fit_logistic(
    x: Float[Tensor, "n d"],
    y: Int[Tensor, "n"],
    n_classes: int,
    *,
    l2: float = 1e-3,
    max_iter: int = MAX_ITER,
) -> LinearProbe:
    """Fit on (x, y); `l2` multiplies the squared weight norm added to the mean cross-entropy."""
    return fit_logistic_many([(x, y)], n_classes, l2=l2, max_iter=max_iter)[0]


def fit_logistic_many(
    problems: list[tuple[Float[Tensor, "n d"], Int[Tensor, "n"]] | Features],
    n_classes: int,
    *,
    l2: float = 1e-3,
    max_iter: int = MAX_ITER,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    names: list[str] | None = None,
    memory_mb: float = DEFAULT_MEMORY_MB,
    group: Any = None,
    device: torch.device | str | None = None,
    inits: list[LinearProbe | None] | None = None,
) -> list[LinearProbe]:
    """One probe per problem ((features, labels) or a `Features` source), each fitted on its own.
    `memory_mb` bounds the features held at once; with `group`, each rank holds its own share of
    every problem's tokens and all ranks get the same probes. `device`: where the chunks are
    computed (default: where the features are; the sweep passes the model's). With `progress`, a bar counts fitted
    probes and names the one being fitted (`names`) with its L-BFGS evaluations. `inits`: per
    problem, a probe whose weight and bias start the fit (a warm start; the standardisation is
    always this problem's own)."""
    sources = [p if hasattr(p, "chunks") else TensorFeatures(*p) for p in problems]
    names = names or [f"probe {i}" for i in range(len(sources))]
    # update(0) redraws whenever the bar's interval has passed, so evaluations show mid-fit; the
    # bar's rate stays probes over elapsed time (progress_bar does not smooth over those redraws)
    bar = progress_bar(total=len(sources), desc="fitting probes", unit="probe", enabled=progress)
    probes = []
    inits = inits or [None] * len(sources)
    for source, name, init in zip(sources, names, inits):

        def report(evaluations: int, name: str = name) -> None:
            # a long fit keeps the screen moving: update(0) redraws at most every mininterval
            bar.set_postfix_str(f"{name}, L-BFGS evaluation {evaluations}", refresh=False)
            bar.update(0)

        rows = chunk_rows(source.d, n_classes, memory_mb, torch.finfo(dtype).bits // 8)
        probes.append(_fit_one(source, n_classes, l2, max_iter, dtype, rows, group, report if progress else None, device,
                               init))
        bar.update(1)
    bar.close()
    return probes


def _standardisation(source: Features, rows: int, group: Any, device=None) -> tuple[int, Tensor, Tensor, torch.device]:
    """n, mean and standard deviation (n - 1 in the denominator, as torch.std) over all ranks."""
    sums, found = None, torch.device("cpu")
    for x, _ in source.chunks(rows):
        found = x.device
        x64 = x.to(found if device is None else device, torch.float64)
        part = torch.stack([x64.sum(0), (x64 * x64).sum(0)])
        sums = part if sums is None else sums + part
    totals = torch.zeros(1 + 2 * source.d, dtype=torch.float64)
    totals[0] = source.n
    if sums is not None:
        totals[1:] = sums.flatten().cpu()
    distributed.all_reduce_sum(totals, group)
    n = int(totals[0])
    if n == 0:
        raise ValueError("no training examples for the probe")
    mean = totals[1 : 1 + source.d] / n
    variance = (totals[1 + source.d :] - n * mean * mean) / max(n - 1, 1)
    device = torch.device(found if device is None else device)
    return n, mean.to(device), variance.clamp(min=0).sqrt().clamp(min=1e-6).to(device), device


def _fit_one(source: Features, n_classes, l2, max_iter, dtype, rows, group, report=None, device=None,
             init: LinearProbe | None = None) -> LinearProbe:
    n, mean, scale, device = _standardisation(source, rows, group, device)

    def standardised():
        for x, y in source.chunks(rows):
            yield ((x.to(device, torch.float64) - mean) / scale).to(dtype), y.to(device).long()

    # everything fits the budget: standardise once instead of at every evaluation
    cached = list(standardised()) if source.n <= rows else None
    weight = torch.zeros(source.d, n_classes, dtype=dtype, device=device)
    bias = torch.zeros(n_classes, dtype=dtype, device=device)
    if init is not None:
        weight.copy_(init.weight)
        bias.copy_(init.bias)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
        history_size=20, line_search_fn="strong_wolfe",
    )
    evaluations = 0

    def closure():
        # mean cross-entropy and its gradient, summed chunk by chunk (and rank by rank) in float64:
        # d loss / d logits = softmax - onehot, so no autograd graph over the tokens is kept
        nonlocal evaluations
        evaluations += 1
        if report is not None:
            report(evaluations)
        totals = torch.zeros(1 + (source.d + 1) * n_classes, dtype=torch.float64, device=device)
        for z, y in (cached if cached is not None else standardised()):
            logits = z @ weight.detach() + bias.detach()
            log_p = torch.log_softmax(logits, dim=-1)
            residual = log_p.exp()
            residual[torch.arange(len(y), device=device), y] -= 1
            totals[0] -= log_p.gather(1, y[:, None]).sum().double()
            totals[1 : 1 + source.d * n_classes] += (z.T @ residual).double().flatten()
            totals[1 + source.d * n_classes :] += residual.sum(0).double()
        distributed.all_reduce_sum(totals, group)
        totals /= n
        w = weight.detach()
        weight.grad = (totals[1 : 1 + source.d * n_classes].view(source.d, n_classes).to(dtype) + 2 * l2 * w)
        bias.grad = totals[1 + source.d * n_classes :].to(dtype)
        return totals[0] + l2 * (w.double() ** 2).sum()  # float64: the line search compares losses closer than float32 resolves

    optimizer.step(closure)
    return LinearProbe(mean.float(), scale.float(), weight.detach().float(), bias.detach().float(), kind="logistic")
