"""Sparse probing on SAE features: k features per class chosen on training tokens, then a logistic probe."""

from __future__ import annotations

import pytest
import torch

from mmlens.errors import InputError
from mmlens.probing import fit_logistic
from mmlens.sae import choose_features, fit_sparse_probe

from test_splice import sae_at

N_CLASSES, D_IN = 3, 16


@pytest.fixture(scope="module")
def tokens():
    """Activations whose class shifts one direction each, and an SAE whose first three features
    read exactly those directions (the rest random)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, N_CLASSES, (300,), generator=generator)
    activations = torch.randn(300, D_IN, generator=generator) * 0.3
    activations[torch.arange(300), labels] += 2.0
    labels[::25] = 255  # unlabelled tokens take no part
    sae = sae_at("adapter.hook_out", D_IN)
    with torch.no_grad():
        sae.W_enc[:, :N_CLASSES] = 4 * torch.eye(D_IN)[:, :N_CLASSES]
        sae.b_enc[:N_CLASSES] = -4.0
        sae.b_dec.zero_()
    return sae, activations, labels


def test_each_class_gets_the_feature_that_reads_its_direction_first(tokens) -> None:
    sae, activations, labels = tokens
    chosen = choose_features(sae.encode(activations), labels, N_CLASSES, k=2)
    assert chosen.shape == (N_CLASSES, 2) and chosen[:, 0].tolist() == [0, 1, 2]


def test_the_probe_reads_only_the_chosen_features_and_predicts_as_the_fit_on_them(tokens) -> None:
    sae, activations, labels = tokens
    sparse = fit_sparse_probe(sae, activations, labels, N_CLASSES, k=1)
    assert sparse.features.tolist() == [0, 1, 2] and sparse.probe.kind == "sparse"
    unread = torch.ones(sae.cfg.d_sae, dtype=torch.bool)
    unread[sparse.features] = False
    assert torch.all(sparse.probe.weight[unread] == 0)
    features = sae.encode(activations).detach()
    labelled = labels != 255
    inner = fit_logistic(features[labelled][:, sparse.features], labels[labelled], N_CLASSES)
    assert torch.equal(sparse.predict(activations), inner.predict(features[:, sparse.features]))
    accuracy = (sparse.predict(activations)[labelled] == labels[labelled]).float().mean()
    assert accuracy > 0.95


def test_a_class_without_training_tokens_and_a_bad_k_are_refused(tokens) -> None:
    sae, activations, labels = tokens
    with pytest.raises(InputError, match="classes \\[3\\]"):
        fit_sparse_probe(sae, activations, labels, N_CLASSES + 1, k=1)
    with pytest.raises(InputError, match="k must be"):
        fit_sparse_probe(sae, activations, labels, N_CLASSES, k=0)
