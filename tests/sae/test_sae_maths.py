"""The SAE computes SAELens's formulas (written out by hand here) for every architecture."""

from __future__ import annotations

import pytest
import torch

from mmlens.errors import ModelLoadError
from mmlens.sae import ARCHITECTURES, SAE, SAEConfig

D_IN, D_SAE = 6, 10


def random_sae(architecture: str, seed: int = 0, **cfg) -> SAE:
    torch.manual_seed(seed)
    if architecture in ("topk", "batchtopk"):
        cfg.setdefault("k", 3)
    if architecture.endswith("transcoder"):
        cfg.setdefault("apply_b_dec_to_input", False)
        cfg.setdefault("d_out", D_IN + 2)
    sae = SAE(SAEConfig(architecture, D_IN, D_SAE, **cfg))
    with torch.no_grad():  # nonzero biases and thresholds, so each term is exercised
        for name, parameter in sae.named_parameters():
            if name != "W_enc" and name != "W_dec":
                parameter.normal_(0, 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.abs_()
    return sae


def hand_encode(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """SAELens: pre = (x - b_dec if apply_b_dec_to_input) @ W_enc + b_enc, then the activation."""
    sae_in = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    pre = sae_in @ sae.W_enc + sae.b_enc
    if hasattr(sae, "threshold"):  # the JumpReLU kinds
        return torch.where(pre > sae.threshold, pre.relu(), torch.zeros_like(pre))
    if sae.cfg.architecture == "topk":
        acts = torch.zeros_like(pre)
        for row in range(pre.shape[0]):
            top = pre[row].argsort(descending=True)[: sae.cfg.k]
            acts[row, top] = pre[row, top].relu()
        return acts
    return pre.relu()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@torch.no_grad()
def test_encode_decode_equal_the_hand_formula(architecture: str) -> None:
    sae = random_sae(architecture)
    x = torch.randn(5, D_IN)
    acts = sae.encode(x)
    torch.testing.assert_close(acts, hand_encode(sae, x), atol=1e-6, rtol=0)
    expected = acts @ sae.W_dec + sae.b_dec
    if architecture.endswith("skip_transcoder"):
        expected = expected + x @ sae.W_skip.T
    torch.testing.assert_close(sae(x), expected, atol=1e-6, rtol=0)
    assert (acts > 0).any() and (acts == 0).any()


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
@torch.no_grad()
def test_error_term_gives_the_input_back_and_its_parts(architecture: str) -> None:
    sae = random_sae(architecture)
    x = torch.randn(4, 7, D_IN)
    sae.use_error_term = True
    _, cache = sae.run_with_cache(x)
    torch.testing.assert_close(cache["hook_sae_output"], x, atol=1e-6, rtol=0)
    recons = cache["hook_sae_recons"]
    assert not torch.allclose(recons, x, atol=1e-2)  # the SAE is lossy: the error term did the work
    torch.testing.assert_close(cache["hook_sae_error"], x - recons, atol=1e-6, rtol=0)


@torch.no_grad()
def test_editing_features_moves_the_output_but_not_the_error() -> None:
    """SAELens recomputes the error without hooks, so a feature edit reaches the output."""
    sae = random_sae("standard")
    sae.use_error_term = True
    x = torch.randn(3, D_IN)
    edited = sae.run_with_hooks(x, fwd_hooks=[("hook_sae_acts_post", lambda acts, hook: acts * 0)])
    clean_recons = sae.decode(sae.encode(x))
    torch.testing.assert_close(edited, sae.b_dec + (x - clean_recons), atol=1e-6, rtol=0)


@torch.no_grad()
def test_topk_rescaled_by_decoder_norm() -> None:
    sae = random_sae("topk", rescale_acts_by_decoder_norm=True)
    x = torch.randn(4, D_IN)
    norms = sae.W_dec.norm(dim=-1)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    scaled = pre * norms
    acts = torch.zeros_like(scaled).scatter(-1, scaled.topk(3, dim=-1).indices, scaled.topk(3, dim=-1).values.relu())
    torch.testing.assert_close(sae.encode(x), acts, atol=1e-6, rtol=0)
    torch.testing.assert_close(sae(x), (acts / norms) @ sae.W_dec + sae.b_dec, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["constant_norm_rescale", "layer_norm"])
@torch.no_grad()
def test_run_time_normalisation(mode: str) -> None:
    sae = random_sae("standard", normalize_activations=mode)
    x = torch.randn(4, D_IN) * 5 + 1
    if mode == "constant_norm_rescale":
        coeff = D_IN ** 0.5 / x.norm(dim=-1, keepdim=True)
        normed, back = x * coeff, lambda y: y / coeff
    else:
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        normed, back = (x - mu) / (std + 1e-5), lambda y: y * std + mu
    acts = ((normed - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
    torch.testing.assert_close(sae.encode(x), acts, atol=1e-5, rtol=0)
    torch.testing.assert_close(sae(x), back(acts @ sae.W_dec + sae.b_dec), atol=1e-5, rtol=0)


@torch.no_grad()
def test_hook_z_sae_reads_heads_as_one_vector() -> None:
    sae = random_sae("standard", reshape_activations="hook_z")
    z = torch.randn(2, 5, 3, 2)  # batch, pos, heads, d_head: 3 x 2 = D_IN
    flat = z.flatten(-2)
    acts = ((flat - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
    torch.testing.assert_close(sae.encode(z), acts, atol=1e-6, rtol=0)
    assert sae(z).shape == z.shape


@torch.no_grad()
def test_batch_topk_selection_keeps_k_per_token_on_average() -> None:
    sae = random_sae("batchtopk")
    pre = torch.randn(8, D_SAE)
    acts = sae.batch_topk(pre)
    assert (acts > 0).sum() == 3 * 8
    assert acts[acts > 0].min() >= pre.relu().flatten().topk(24).values.min()


def test_bad_configs_say_what_to_do() -> None:
    with pytest.raises(ModelLoadError, match="unknown architecture 'gated'.*known: standard, jumprelu, topk"):
        SAEConfig("gated", D_IN, D_SAE)
    with pytest.raises(ModelLoadError, match="needs k"):
        SAEConfig("topk", D_IN, D_SAE)
    with pytest.raises(ModelLoadError, match="apply_b_dec_to_input must be False"):
        SAEConfig("transcoder", D_IN, D_SAE)
