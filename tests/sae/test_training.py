"""SAE training: SAELens's objectives written out by hand, exact folding, determinism, the saved
format, token choice, refusals before any forward, and the held-out figure docs/sae.md states."""

from __future__ import annotations

import pytest
import torch

import mmlens
from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import HookNameError, InputError
from mmlens.interventions.groups import TokenGroup
from mmlens.sae import evaluate_sae, image_token_activations, train_sae, train_sae_on_activations
from mmlens.sae.training import TrainingSettings, _TrainingState

D_IN, D_SAE = 8, 24


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: a second intra-op thread only adds contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def low_rank_tokens(n: int = 400, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.rand(n, 6, generator=generator) * (torch.rand(n, 6, generator=generator) < 0.3)
    basis = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(99))  # one dictionary for every draw
    return 5 * codes @ basis + 2.0


def state(architecture: str, **settings) -> _TrainingState:
    if architecture in ("topk", "batchtopk"):
        settings.setdefault("k", 3)
    cfg = TrainingSettings(architecture=architecture, d_sae=D_SAE, **settings)
    torch.manual_seed(0)
    return _TrainingState(cfg, low_rank_tokens(), {"hook_name": "adapter.hook_out"})


def test_losses_are_saelens_formulas() -> None:
    x = low_rank_tokens(16, seed=1)
    trained = state("standard", l1_coefficient=0.5, l1_warm_up_steps=10)
    sae = trained.sae
    losses, features, recons = trained.losses(x, step=4)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert torch.equal(features, pre.relu())
    torch.testing.assert_close(losses["mse"], (features @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean())
    # the L1 coefficient warmed up to 5 of 10 steps, each activation weighted by its decoder norm
    l1 = (features * sae.W_dec.norm(dim=-1)).abs().sum(-1).mean()
    torch.testing.assert_close(losses["sparsity_loss"], 0.5 * 0.5 * l1)

    jump = state("jumprelu", l0_coefficient=2.0)
    losses, features, _ = jump.losses(x, step=0)
    pre = (x - jump.sae.b_dec) @ jump.sae.W_enc + jump.sae.b_enc
    threshold = jump.log_threshold.exp()
    assert torch.equal(features, pre * (pre > threshold))
    torch.testing.assert_close(losses["sparsity_loss"], 2.0 * (pre > threshold).float().sum(-1).mean())
    losses["sparsity_loss"].backward()
    # the step's threshold gradient: -(1/bandwidth) x rectangle((pre - threshold) / bandwidth), summed
    bandwidth = jump.cfg.jumprelu_bandwidth
    window = (((pre - threshold) / bandwidth).abs() < 0.5).float()
    expected = (-2.0 / len(x)) * (window / bandwidth).sum(0) * threshold  # chain rule through exp
    torch.testing.assert_close(jump.log_threshold.grad, expected.detach())


def test_aux_k_loss_reconstructs_the_residual_with_dead_features_only() -> None:
    x = low_rank_tokens(16, seed=2)
    trained = state("topk", dead_feature_window=1)
    losses, _, _ = trained.losses(x, step=0)
    assert float(losses["aux_loss"]) == 0.0  # nothing dead yet
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:6] = True
    trained.steps_since_fired = dead.long()
    losses, _, recons = trained.losses(x, step=1)
    sae = trained.sae
    norm = sae.W_dec.norm(dim=-1)
    scaled = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc) * norm
    k_aux = D_IN // 2  # SAELens: d_in / 2, scaled by n_dead / k_aux when at most that many are dead
    top = scaled[:, :6].topk(k_aux, dim=-1)
    aux_features = torch.zeros_like(scaled).scatter(-1, top.indices, top.values)
    residual = x - recons
    expected = ((aux_features / norm) @ sae.W_dec + sae.b_dec - residual).pow(2).sum(-1).mean()
    torch.testing.assert_close(losses["aux_loss"], min(6 / k_aux, 1.0) * expected)


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_folding_scale_and_decoder_norms_leaves_the_reconstruction(architecture: str) -> None:
    trained = state(architecture, steps=20, lr=1e-2, batch_size=64)
    trained.run()
    x = low_rank_tokens(32, seed=3)
    with torch.no_grad():
        _, _, recons = trained.losses(x * trained.scale, step=0)
        sae = trained.finished_sae()
        torch.testing.assert_close(sae.decode(sae.encode(x)), recons / trained.scale, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE), atol=1e-5, rtol=0)


def test_training_is_seeded_and_learns(tmp_path) -> None:
    x, held = low_rank_tokens(600, seed=4), low_rank_tokens(200, seed=5)
    settings = dict(architecture="topk", k=4, d_sae=D_SAE, steps=200, batch_size=64, lr=3e-3)
    first = train_sae_on_activations(x, held_out=held, **settings)
    again = train_sae_on_activations(x, held_out=held, **settings)
    other = train_sae_on_activations(x, held_out=held, **settings | {"seed": 1})
    assert torch.equal(first.sae.W_enc, again.sae.W_enc) and first.log.equals(again.log)
    assert not torch.equal(first.sae.W_enc, other.sae.W_enc)
    assert first.held_out.variance_explained > 0.9 and first.held_out.l0 <= 4
    assert first.log["mse"].iloc[-1] < first.log["mse"].iloc[0] / 5
    assert list(first.log.columns) == ["step", "loss", "mse", "sparsity_loss", "aux_loss", "l0", "variance_explained",
                                       "dead_features"]

    batch = train_sae_on_activations(x, **settings | {"architecture": "batchtopk"}, metadata={"hook_name": "adapter.hook_out"})
    batch.sae.save(tmp_path / "batchtopk")
    loaded = mmlens.load_sae(tmp_path / "batchtopk")
    saved = (tmp_path / "batchtopk" / "cfg.json").read_text()
    assert '"architecture": "jumprelu"' in saved and '"hook_name": "adapter.hook_out"' in saved  # what sae-lens reads
    assert torch.equal(loaded.encode(held), batch.sae.encode(held))
    assert float(loaded.threshold.detach().min()) > 0  # runs as the JumpReLU with its learned threshold
    # the learned threshold keeps about k features per token, as the batch top-k did in training
    assert abs(evaluate_sae(loaded, held).l0 - 4) < 1.5


def test_refusals_come_before_any_forward(embedded) -> None:
    model, scenes = embedded
    forwards = []
    handle = model.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        with pytest.raises(InputError, match="architecture must be one of"):
            train_sae(model, scenes, "adapter.hook_out", architecture="gated")
        with pytest.raises(InputError, match="needs k"):
            train_sae(model, scenes, "adapter.hook_out", architecture="topk")
        with pytest.raises(HookNameError):
            train_sae(model, scenes, "adapter.hook_outt")
        with pytest.raises(InputError, match="also training scenes"):
            train_sae(model, scenes, "adapter.hook_out", held_out=scenes.select([0, 1]))
    finally:
        handle.remove()
    assert not forwards
    with pytest.raises(InputError, match="chose no image token"):
        image_token_activations(model, scenes.select([0, 1]), "adapter.hook_out", tokens=TokenGroup.text())


def test_token_groups_choose_the_rows(embedded) -> None:
    model, scenes = embedded
    two = scenes.select([0, 1])
    with torch.no_grad():
        every = image_token_activations(model, two, "adapter.hook_out")
        corner = image_token_activations(model, two, "adapter.hook_out", tokens=TokenGroup.box(0, 0, 2, 2))
        patches = image_token_activations(model, two, "vision.blocks.0.hook_resid_post", tokens=TokenGroup.box(0, 0, 2, 2))
    assert every.activations.shape == (2 * 64, model.cfg.d_model) and every.n_images == 2
    assert corner.activations.shape[0] == 2 * 4
    # the corner's rows are the same numbers as those cells of the full grid
    cells = every.cell.view(2, 64)
    picked = torch.isin(every.cell, corner.cell[:4]) & (cells.flatten() >= 0)
    assert torch.equal(every.activations[picked], corner.activations)
    assert torch.equal(corner.labels, every.labels[picked])
    assert patches.activations.shape[0] >= 2 * 4 and patches.activations.shape[1] == model.cfg.vision.d_model
    shape = int(every.labels[(every.labels > 0) & (every.labels != every.ignore_index)][0])
    with torch.no_grad():
        of_shape = image_token_activations(model, two, "adapter.hook_out", tokens=TokenGroup.of_class(shape))
        plain = image_token_activations(model, list(two["image"]), "adapter.hook_out")
    assert torch.equal(of_shape.activations, every.activations[every.labels == shape])  # by the scenes' masks
    assert plain.labels is None and torch.equal(plain.activations, every.activations)


# the figure docs/sae.md states, from this exact configuration
DOCS_FIGURE = dict(architecture="topk", k=4, d_sae=128, steps=400, batch_size=256, lr=2e-3, seed=0)
DOCS_VARIANCE_EXPLAINED = 0.98


def test_held_out_variance_explained_is_the_documented_figure(embedded) -> None:
    model, scenes = embedded
    training = train_sae(model, scenes.select(range(36)), "adapter.hook_out", held_out=scenes.select(range(36, 48)),
                         **DOCS_FIGURE)
    assert training.held_out.n_tokens == 12 * 64
    assert round(training.held_out.variance_explained, 2) == DOCS_VARIANCE_EXPLAINED
    assert training.sae.cfg.hook_name == "adapter.hook_out"
    assert training.sae.cfg.metadata["model_name"] == "tiny-shapes-llava"  # loadable by name, no local path


@pytest.fixture(scope="module")
def embedded():
    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    return model, load_segmentation("scenes", split="train", n=48, seed=0)
