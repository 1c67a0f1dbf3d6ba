"""Probe penalties chosen by k-fold cross-validation on the training images alone.

Training images (never tokens) are dealt into k folds from the sweep's seed; for each candidate
penalty a probe is fitted on k - 1 folds and its held-out loss measured on the last, and the
penalty with the lowest mean held-out loss over the folds is used for the probe fitted on all
training images. Ridge needs no refits: its held-out squared error follows exactly from per-fold
sufficient statistics. Logistic probes are refitted per fold along the grid, strongest penalty
first, each fit warm-started from the previous one. The test images choose nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .. import distributed
from ..errors import InputError
from .linear import LinearProbe
from .ridge import RidgeStatistics

from ..defaults import DEFAULT_FOLDS, LOGISTIC_L2S, RIDGE_ALPHAS  # noqa: F401  (re-exported)


def image_folds(n_train: int, n_folds: int, seed: int) -> np.ndarray:
    """The fold of each training image (in `train_indices` order): a seeded deal, so every fold
    gets n_train // n_folds or one more images, whatever the batch size or number of processes."""
    if n_folds < 2:
        raise InputError(f"cv_folds must be at least 2 to hold any image out, got {n_folds}")
    if n_train < n_folds:
        raise InputError(f"{n_train} training images cannot be dealt into {n_folds} folds; "
                         "use more images or fewer cv_folds")
    order = np.random.default_rng([seed, 0x5EED]).permutation(n_train)
    folds = np.empty(n_train, dtype=np.int64)
    folds[order] = np.arange(n_train) % n_folds
    return folds


def check_grid(grid: Sequence[float], name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in grid)
    if not values or any(not np.isfinite(v) or v <= 0 for v in values):
        raise InputError(f"{name} must be a non-empty list of positive numbers, got {list(grid)}")
    return tuple(sorted(set(values)))


@dataclass(frozen=True)
class PenaltyChoice:
    """The cross-validated losses of one probe (a site and label set) and the penalty they pick."""

    candidates: tuple[float, ...]
    losses: tuple[float, ...]  # mean held-out loss per candidate (ridge: squared error; logistic: cross-entropy)
    chosen: float

    @classmethod
    def from_losses(cls, candidates: Sequence[float], losses: Sequence[float]) -> "PenaltyChoice":
        losses = tuple(float(v) for v in losses)
        if not np.all(np.isfinite(losses)):
            raise InputError(f"cross-validated losses {losses} are not finite; the training features hold "
                             "values no probe can fit (check the activations at this site)")
        return cls(tuple(candidates), losses, float(candidates[int(np.argmin(losses))]))

    @property
    def at_edge(self) -> bool:
        """The chosen penalty is the grid's smallest or largest: the best may lie outside it."""
        return len(self.candidates) > 1 and self.chosen in (self.candidates[0], self.candidates[-1])


class RidgeFolds:
    """Ridge sufficient statistics kept per fold; their sum is the whole training set's."""

    def __init__(self, d: int, n_classes: int, n_label_sets: int, n_folds: int, device="cpu"):
        self.folds = [RidgeStatistics(d, n_classes, n_label_sets, device=device) for _ in range(n_folds)]

    def update(self, x: torch.Tensor, fold: torch.Tensor, *labels: torch.Tensor) -> None:
        """Add tokens `x` whose images lie in folds `fold` (one fold id per token)."""
        fold = fold.to(x.device)
        for f in torch.unique(fold).tolist():
            rows = fold == f
            self.folds[f].update(x[rows], *(y.to(x.device)[rows] for y in labels))

    def all_reduce(self, group=None) -> "RidgeFolds":
        for stats in self.folds:
            stats.all_reduce(group)
        return self

    def total(self) -> RidgeStatistics:
        out = RidgeStatistics(self.folds[0].gram.shape[0], self.folds[0].n_classes, self.folds[0].cross.shape[0],
                              device=self.folds[0].gram.device)
        for stats in self.folds:  # fold order: the same sums on any number of ranks
            out.merge(stats)
        return out

    def choose(self, alphas: Sequence[float], label_set: int = 0, total: RidgeStatistics | None = None) -> PenaltyChoice:
        """The alpha with the lowest held-out squared error per token, averaged over folds (`total`:
        `self.total()`, when the caller has it already)."""
        total = self.total() if total is None else total
        errors = np.zeros(len(alphas))
        n_held = 0
        for held in self.folds:
            if held.n == 0:
                continue
            rest = total.minus(held)
            for a, alpha in enumerate(alphas):
                errors[a] += held.squared_error(rest.solution(alpha, label_set), label_set)
            n_held += held.n
        if n_held == 0:
            raise InputError("no training tokens to cross-validate the ridge penalty on")
        return PenaltyChoice.from_losses(alphas, errors / n_held)


def held_out_cross_entropy(probe: LinearProbe, source, rows: int) -> tuple[float, int]:
    """Summed cross-entropy of `probe` over a feature source's tokens, and their number."""
    total, n = 0.0, 0
    for x, y in source.chunks(rows):
        logits = probe.logits(x.to(probe.weight.device)).double()
        total -= float(torch.log_softmax(logits, -1).gather(1, y.to(logits.device).long()[:, None]).sum())
        n += len(y)
    return total, n


def choose_logistic_l2(store, label_set: int, l2s: Sequence[float], n_folds: int, fit, rows: int,
                       group=None) -> PenaltyChoice:
    """The L2 penalty with the lowest held-out cross-entropy per token over the folds of `store`.
    `fit(sources, l2, inits)` fits logistic probes (the sweep's settings bound in); per fold the
    grid is walked from the strongest penalty down, each fit warm-started from the last."""
    losses = np.zeros(len(l2s))
    order = sorted(range(len(l2s)), key=lambda a: -l2s[a])
    held_tokens = 0.0
    for held in range(n_folds):
        train = store.features(label_set, folds=[f for f in range(n_folds) if f != held])
        held_out = store.features(label_set, folds=[held])
        previous = None
        counted = False
        for a in order:
            previous = fit([train], l2s[a], [previous])[0]
            total, n = held_out_cross_entropy(previous, held_out, rows)
            sums = torch.tensor([total, float(n)], dtype=torch.float64)
            distributed.all_reduce_sum(sums, group)
            losses[a] += float(sums[0])
            if not counted:
                held_tokens += float(sums[1])
                counted = True
    if held_tokens == 0:
        raise InputError("no training tokens to cross-validate the logistic penalty on")
    return PenaltyChoice.from_losses(l2s, losses / held_tokens)


__all__ = ["DEFAULT_FOLDS", "LOGISTIC_L2S", "PenaltyChoice", "RIDGE_ALPHAS", "RidgeFolds", "check_grid", "choose_logistic_l2",
           "held_out_cross_entropy", "image_folds"]
