"""How well each SAE feature lines up with each segmentation class: IoU over image tokens.

A feature's map thresholded (active where its activation exceeds `threshold`) is compared with
each class's mask at token resolution: the ground-truth labels the probes use
(`mmlens.probing.token_labels`, each token the majority class of its pixel box), so a feature is
scored on the same tokens and the same grid as a probe. IoU = |active and class| / |active or
class| over the valid tokens of all images, the segmentation metric applied to a feature as
network dissection does to units (Bau et al. 2017, https://arxiv.org/abs/1704.05796).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..data.schema import IGNORE_INDEX
from ..errors import InputError
from ..probing.token_labels import TokenLabels


def feature_class_iou(
    activations: Float[Tensor, "*tokens features"],
    labels: TokenLabels | Int[Tensor, "*tokens"],
    *,
    n_classes: int,
    features: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    threshold: float | Float[Tensor, "features"] = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> pd.DataFrame:
    """IoU of every feature's thresholded activation with every class, a features x classes table.

    `activations` are SAE features at image tokens: `layout.gather` rows [n_images, n_tokens,
    features] (`feature_activations`, `FeatureMaps.activations`) with `labels` the `TokenLabels`
    of the same images and stage (`token_labels(masks, inputs.layout, n_classes=..., stage=site.grid)`),
    or rows of any shape with `labels` a class tensor of the same shape (`ignore_index` where a
    token has no label, as `TokenActivations.labels`). Tokens without a label are left out.
    `features` names the columns of `activations` (default 0, 1, ...); `threshold` is one value or
    one per feature. A class absent from every labelled token scores NaN."""
    classes_of = labels.labels if isinstance(labels, TokenLabels) else torch.as_tensor(labels)
    labelled = labels.valid if isinstance(labels, TokenLabels) else classes_of != ignore_index
    if activations.ndim != classes_of.ndim + 1 or activations.shape[:-1] != classes_of.shape:
        raise InputError(f"activations {tuple(activations.shape)} and token labels {tuple(classes_of.shape)} are not "
                         "the same images and tokens; label the same inputs at the SAE's stage (stage=site.grid)")
    names = list(range(activations.shape[-1])) if features is None else [int(f) for f in features]
    if len(names) != activations.shape[-1]:
        raise InputError(f"{len(names)} feature names for {activations.shape[-1]} activation columns")
    classes = list(class_names) if class_names is not None else [str(c) for c in range(n_classes)]
    if len(classes) != n_classes:
        raise InputError(f"{len(classes)} class names for {n_classes} classes")
    valid = labelled.flatten().to(activations.device)
    rows = activations.reshape(-1, activations.shape[-1])[valid].float()
    active = (rows > torch.as_tensor(threshold, dtype=torch.float32, device=rows.device)).float()
    truth = torch.nn.functional.one_hot(classes_of.flatten()[valid.cpu()].long().clamp(0, n_classes - 1), n_classes)
    truth = truth.float().to(rows.device)
    both = active.T @ truth  # [features, classes]
    either = active.sum(0)[:, None] + truth.sum(0)[None, :] - both
    iou = torch.where(truth.sum(0)[None, :] > 0, both / either.clamp(min=1), torch.full_like(both, float("nan")))
    return pd.DataFrame(iou.cpu().numpy(), index=pd.Index(names, name="feature"), columns=pd.Index(classes, name="class"))


def best_feature_per_class(iou: pd.DataFrame) -> pd.DataFrame:
    """For each class, the feature with the highest IoU and that IoU (classes absent: left out)."""
    scored = iou.dropna(axis=1, how="all")
    return pd.DataFrame({"feature": scored.idxmax(axis=0), "iou": scored.max(axis=0)})
