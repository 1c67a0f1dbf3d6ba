"""Ridge-regression probes from sufficient statistics accumulated in float64.

A one-vs-rest ridge classifier on standardised features needs only n, sum(x), sum(x x^T) and
sum(x y^T) over the training tokens. These are accumulated batch by batch as activations stream
past (one pass, constant memory), add up across workers with `merge` (or `all_reduce` over
the ranks of a torch.distributed group), and give the probe in
closed form: standardising is a congruence of the Gram matrix.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .. import distributed
from .linear import LinearProbe


class RidgeStatistics:
    """Running sums for one feature site and any number of label sets (e.g. real, shuffled)."""

    def __init__(self, d: int, n_classes: int, n_label_sets: int = 1, device: torch.device | str = "cpu"):
        self.n = 0
        self.n_classes = n_classes
        self.sum_x = torch.zeros(d, dtype=torch.float64, device=device)
        self.gram = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.cross = torch.zeros(n_label_sets, d, n_classes, dtype=torch.float64, device=device)
        self.class_counts = torch.zeros(n_label_sets, n_classes, dtype=torch.float64, device=device)

    def update(self, x: Float[Tensor, "n d"], *labels: Int[Tensor, "n"]) -> None:
        if len(labels) != self.cross.shape[0]:
            raise ValueError(f"expected {self.cross.shape[0]} label sets, got {len(labels)}")
        x = x.to(self.gram.device, torch.float64)
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        self.gram += x.T @ x
        for k, y in enumerate(labels):
            onehot = torch.nn.functional.one_hot(y.to(x.device).long(), self.n_classes).to(torch.float64)
            self.cross[k] += x.T @ onehot
            self.class_counts[k] += onehot.sum(0)

    def merge(self, other: "RidgeStatistics") -> "RidgeStatistics":
        """Add another worker's sums into these (same site, same label sets)."""
        self.n += other.n
        for name in ("sum_x", "gram", "cross", "class_counts"):
            getattr(self, name).add_(getattr(other, name).to(self.gram.device))
        return self

    def all_reduce(self, group: Any = None) -> "RidgeStatistics":
        """Sum these statistics over the ranks of a process group (a no-op in one process)."""
        if distributed.active(group):
            count = torch.tensor([float(self.n)], dtype=torch.float64)
            distributed.all_reduce_sum(count, group)
            self.n = int(count.item())
            for name in ("sum_x", "gram", "cross", "class_counts"):
                distributed.all_reduce_sum(getattr(self, name), group)
        return self

    def minus(self, other: "RidgeStatistics") -> "RidgeStatistics":
        """These sums less another set's (e.g. all training folds less the held-out one)."""
        out = RidgeStatistics(self.gram.shape[0], self.n_classes, self.cross.shape[0], device=self.gram.device)
        out.n = self.n - other.n
        for name in ("sum_x", "gram", "cross", "class_counts"):
            getattr(out, name).copy_(getattr(self, name) - getattr(other, name).to(self.gram.device))
        return out

    def solution(self, alpha: float = 1e-2, label_set: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(mean, scale, weight, bias) in float64 of the ridge probe `solve` returns."""
        if self.n < 2:
            raise ValueError(f"need at least 2 training tokens to fit a probe, got {self.n}")
        n = self.n
        mean = self.sum_x / n
        covariance = self.gram / n - torch.outer(mean, mean)
        scale = covariance.diagonal().clamp(min=0).sqrt().clamp(min=1e-6)
        inv = 1.0 / scale
        z_gram = covariance * torch.outer(inv, inv)  # (Z^T Z) / n for Z = (X - mean) / scale
        y_mean = self.class_counts[label_set] / n
        z_cross = (self.cross[label_set] / n - torch.outer(mean, y_mean)) * inv[:, None]
        eye = torch.eye(z_gram.shape[0], dtype=torch.float64, device=z_gram.device)
        weight = torch.linalg.solve(z_gram + alpha * eye, z_cross)
        return mean, scale, weight, y_mean

    def solve(self, alpha: float = 1e-2, label_set: int = 0) -> LinearProbe:
        """The ridge probe minimising |Z W + b - Y|^2 + alpha * n * |W|^2 on standardised Z."""
        mean, scale, weight, bias = self.solution(alpha, label_set)
        return LinearProbe(mean.float(), scale.float(), weight.float(), bias.float(), kind="ridge")

    def squared_error(self, solution: tuple[Tensor, Tensor, Tensor, Tensor], label_set: int = 0) -> float:
        """sum over these tokens of |Z W + b - onehot(y)|^2 for a probe fitted elsewhere, exactly
        from the sums: Z's moments follow from sum(x) and sum(x x^T) for any mean and scale."""
        mean, scale, weight, bias = (t.to(self.gram.device, torch.float64) for t in solution)
        n, inv = self.n, 1.0 / scale
        sum_z = (self.sum_x - n * mean) * inv
        centred = self.gram - torch.outer(mean, self.sum_x) - torch.outer(self.sum_x, mean) + n * torch.outer(mean, mean)
        z_gram = centred * torch.outer(inv, inv)
        z_cross = (self.cross[label_set] - torch.outer(mean, self.class_counts[label_set])) * inv[:, None]
        predicted_sq = (weight * (z_gram @ weight)).sum() + 2 * bias @ (weight.T @ sum_z) + n * (bias @ bias)
        predicted_dot_truth = (weight * z_cross).sum() + bias @ self.class_counts[label_set]
        return float(predicted_sq - 2 * predicted_dot_truth + n)
