"""Sparse probing: a class probe that reads only the k SAE features that best tell each class apart.

For each class the k features whose mean activation on the class's training tokens exceeds their
mean on the other tokens the most are chosen (the mean-difference ranking of Gurnee et al. 2023,
https://arxiv.org/abs/2305.01610, as SAE sparse-probing studies use it: Kantamneni et al. 2025,
https://arxiv.org/abs/2502.16681); a logistic probe (`probing.fit_logistic`) is fitted on the
union of the chosen features, and laid out over all features with zero weight elsewhere, so it is
an ordinary `LinearProbe` on the SAE's features. Selection uses the training tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..data.schema import IGNORE_INDEX
from ..errors import InputError
from ..probing.linear import LinearProbe
from ..probing.logistic import fit_logistic
from ..probing.sparse import mean_difference_ranking
from .sae import SAE


@dataclass(frozen=True)
class SparseProbe:
    """A probe over `sae`'s features: `chosen[c]` the k features chosen for class c (best first),
    `probe` the logistic probe over all d_sae features (zero weight outside the chosen ones)."""

    sae: SAE
    chosen: Int[Tensor, "n_classes k"]
    probe: LinearProbe

    @property
    def features(self) -> Int[Tensor, "n_chosen"]:
        """Every feature the probe reads, sorted."""
        return self.chosen.flatten().unique()

    @torch.no_grad()
    def predict(self, activations: Float[Tensor, "n d_in"]) -> Int[Tensor, "n"]:
        """The class of each row of activations at the SAE's point (encoded by the SAE first)."""
        return self.probe.predict(self.sae.encode(activations.to(self.sae.W_enc.dtype)).float())


def choose_features(features: Float[Tensor, "n d_sae"], labels: Int[Tensor, "n"], n_classes: int, k: int,
                    ignore_index: int = IGNORE_INDEX) -> Int[Tensor, "n_classes k"]:
    """Per class, the k features with the largest mean activation on its tokens minus the mean on
    the other labelled tokens (a class without tokens is refused by name)."""
    labelled = labels != ignore_index
    x, y = features[labelled].float(), labels[labelled].long()
    counts = torch.bincount(y, minlength=n_classes)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise InputError(f"classes {missing} have no labelled training token; choose features on images that show them "
                         "or leave them out of n_classes")
    # SAE features are non-negative: a feature marks a class by firing on it (signed difference)
    return mean_difference_ranking(torch.zeros(n_classes, x.shape[1]).index_add_(0, y, x), counts, k, absolute=False)


@torch.no_grad()
def fit_sparse_probe(sae: SAE, activations: Float[Tensor, "n d_in"], labels: Int[Tensor, "n"], n_classes: int, k: int,
                     *, l2: float = 1e-3, ignore_index: int = IGNORE_INDEX) -> SparseProbe:
    """A sparse probe with `k` features per class, chosen and fitted on these training tokens
    (activations at the SAE's point, e.g. `TokenActivations.activations`, with their labels)."""
    if not 1 <= k <= sae.cfg.d_sae:
        raise InputError(f"k must be in 1..{sae.cfg.d_sae} (the SAE's features), got {k}")
    if activations.shape[:1] != labels.shape:
        raise InputError(f"{activations.shape[0]} activation rows but {labels.shape[0]} labels")
    features = sae.encode(activations.to(sae.W_enc.dtype)).float()
    chosen = choose_features(features, labels, n_classes, k, ignore_index)
    columns = chosen.flatten().unique()
    labelled = labels != ignore_index
    inner = fit_logistic(features[labelled][:, columns], labels[labelled].long(), n_classes, l2=l2)
    mean, scale = torch.zeros(sae.cfg.d_sae, dtype=inner.mean.dtype), torch.ones(sae.cfg.d_sae, dtype=inner.scale.dtype)
    weight = torch.zeros(sae.cfg.d_sae, n_classes, dtype=inner.weight.dtype)
    mean[columns], scale[columns], weight[columns] = inner.mean, inner.scale, inner.weight
    return SparseProbe(sae, chosen, LinearProbe(mean, scale, weight, inner.bias, kind="sparse"))
