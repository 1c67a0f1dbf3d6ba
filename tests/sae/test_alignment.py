"""IoU of SAE features with segmentation classes at token resolution, on scenes' masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import InputError
from mmlens.probing.token_labels import token_labels
from mmlens.sae import best_feature_per_class, feature_activations, feature_class_iou
from mmlens.testing import tiny_llava

from test_splice import sae_at

N_CLASSES = 9  # scenes: background and eight coloured shapes


@pytest.fixture(scope="module")
def labelled():
    scenes = load_segmentation("scenes", split="train", n=4)
    model = HookedMLLM.from_hf(*tiny_llava())
    inputs = model.prepare([s["image"] for s in scenes], ["what is in the image ?"] * 4)
    masks = np.stack([model.transform_mask(np.asarray(s["mask"])) for s in scenes])
    return model, inputs, token_labels(masks, inputs.layout, n_classes=N_CLASSES)


def test_a_feature_that_is_a_class_indicator_scores_one_and_a_constant_scores_the_class_share(labelled) -> None:
    _, _, labels = labelled
    present = labels.labels[labels.valid].unique().tolist()
    shape = int(next(c for c in present if c != 0))
    indicator = (labels.labels == shape).float()
    always = torch.ones_like(indicator)
    iou = feature_class_iou(torch.stack([indicator, always], -1), labels, n_classes=N_CLASSES, features=[10, 20])
    assert iou.shape == (2, N_CLASSES) and list(iou.index) == [10, 20]
    assert iou.loc[10, str(shape)] == 1.0
    n_valid = int(labels.valid.sum())
    for c in range(N_CLASSES):
        share = int((labels.labels[labels.valid] == c).sum()) / n_valid
        assert iou.loc[20, str(c)] == pytest.approx(share) if share else np.isnan(iou.loc[20, str(c)])
    best = best_feature_per_class(iou)
    assert best.loc[str(shape), "feature"] == 10 and best.loc[str(shape), "iou"] == 1.0


@torch.no_grad()
def test_sae_features_score_as_a_count_over_valid_tokens_does(labelled) -> None:
    model, inputs, labels = labelled
    sae = sae_at("adapter.hook_out", model.cfg.d_model)
    features = list(range(0, 256, 16))
    _, acts = feature_activations(model, sae, inputs, features)
    threshold = acts.flatten(0, 1).median(0).values  # one threshold per feature
    iou = feature_class_iou(acts, labels, n_classes=N_CLASSES, features=features, threshold=threshold)
    valid = labels.valid
    for column, feature in enumerate(features):
        active = set(zip(*(acts[..., column] > threshold[column]).logical_and(valid).nonzero().T.tolist()))
        for c in range(N_CLASSES):
            members = set(zip(*((labels.labels == c) & valid).nonzero().T.tolist()))
            expected = len(active & members) / len(active | members) if members else float("nan")
            assert iou.loc[feature, str(c)] == pytest.approx(expected, nan_ok=True)
    # rows flattened with their class (ignore index where unlabelled), as training activations keep them
    flat_labels = torch.where(valid, labels.labels, torch.full_like(labels.labels, labels.ignore_index))
    flat = feature_class_iou(acts.flatten(0, 1), flat_labels.flatten(), n_classes=N_CLASSES, features=features,
                             threshold=threshold)
    assert flat.equals(iou)


def test_activations_of_other_tokens_are_refused(labelled) -> None:
    _, _, labels = labelled
    with pytest.raises(InputError, match="not the same images and tokens"):
        feature_class_iou(torch.zeros(4, 17, 3), labels, n_classes=N_CLASSES)
