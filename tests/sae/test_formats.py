"""Loading every format from files written here with each format's own field names, and saving
in SAELens's; encodings equal the formulas of the library that wrote the file."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mmlens
from mmlens.errors import InputError, ModelLoadError
from mmlens.sae import ARCHITECTURES, SAE

from test_sae_maths import D_IN, D_SAE, hand_encode, random_sae


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@torch.no_grad()
def test_save_then_load_round_trips(architecture: str, tmp_path: Path) -> None:
    sae = random_sae(architecture, metadata={"hook_name": "adapter.hook_out", "model_name": "tiny"})
    if architecture.endswith("transcoder"):
        sae.cfg.metadata["hook_name_out"] = "blocks.0.hook_mlp_out"
    sae.save(tmp_path)
    saved = json.loads((tmp_path / "cfg.json").read_text())
    # SAELens 6's fields; a BatchTopK is saved as the JumpReLU SAELens runs it as
    assert saved["architecture"] == ("jumprelu" if architecture == "batchtopk" else architecture)
    assert {"d_in", "d_sae", "dtype", "apply_b_dec_to_input", "normalize_activations", "metadata"} <= set(saved)
    assert set(load_file(tmp_path / "sae_weights.safetensors")) == set(sae.state_dict())
    loaded = mmlens.load_sae(tmp_path)
    # the file says which SAELens layout it follows (sae-lens reads an unversioned one as pre-6)
    assert loaded.cfg == replace(sae.cfg, metadata={**sae.cfg.metadata, "sae_lens_version": "6.0.0"})
    x = torch.randn(4, D_IN)
    assert torch.equal(loaded.encode(x), sae.encode(x)) and torch.equal(loaded(x), sae(x))


def _old_sae_lens_folder(folder: Path, weights: dict, **cfg) -> Path:
    """A SAELens 3-5 folder: flat keys, `hook_point`, `activation_fn_str`, `activation_fn_kwargs`."""
    folder.mkdir(exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps({
        "d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32", "device": "cpu", "hook_point": "blocks.1.hook_resid_pre",
        "hook_point_layer": 1, "model_name": "gpt2", "sae_lens_version": "3.5.0", **cfg}))
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "sae_weights.safetensors")
    return folder


@torch.no_grad()
def test_old_sae_lens_configs(tmp_path: Path) -> None:
    reference = random_sae("topk", k=4)
    weights = {k: v for k, v in reference.state_dict().items()}
    folder = _old_sae_lens_folder(tmp_path / "topk", weights, activation_fn_str="topk", activation_fn_kwargs={"k": 4},
                                  normalize_activations=False)
    loaded = mmlens.load_sae(folder)
    assert loaded.cfg.architecture == "topk" and loaded.cfg.k == 4 and loaded.cfg.hook_name == "blocks.1.hook_resid_pre"
    assert loaded.cfg.normalize_activations == "none" and loaded.cfg.metadata["model_name"] == "gpt2"
    x = torch.randn(3, D_IN)
    assert torch.equal(loaded.encode(x), reference.encode(x))

    # finetuning_scaling_factor: SAELens < 6 decoded (f * scaling_factor) @ W_dec + b_dec
    standard = random_sae("standard")
    scale = torch.rand(D_SAE) + 0.5
    folder = _old_sae_lens_folder(tmp_path / "scaled", {**standard.state_dict(), "scaling_factor": scale},
                                  activation_fn_str="relu", finetuning_scaling_factor=True)
    loaded = mmlens.load_sae(folder, hook_name="blocks.0.hook_resid_post")
    acts = standard.encode(x)
    torch.testing.assert_close(loaded(x), (acts * scale) @ standard.W_dec + standard.b_dec, atol=1e-6, rtol=0)
    assert loaded.cfg.hook_name == "blocks.0.hook_resid_post"  # the caller's point replaces the file's


@torch.no_grad()
def test_gemma_scope_params_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    params = {"W_enc": rng.normal(size=(D_IN, D_SAE)), "W_dec": rng.normal(size=(D_SAE, D_IN)),
              "b_enc": rng.normal(size=D_SAE), "b_dec": rng.normal(size=D_IN), "threshold": np.abs(rng.normal(size=D_SAE))}
    np.savez(tmp_path / "params.npz", **{k: v.astype(np.float32) for k, v in params.items()})
    sae = mmlens.load_sae(tmp_path / "params.npz", hook_name="blocks.0.hook_resid_post")
    assert sae.cfg.architecture == "jumprelu" and not sae.cfg.apply_b_dec_to_input
    x = torch.randn(5, D_IN)
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in params.items()}
    pre = x @ t["W_enc"] + t["b_enc"]  # Gemma Scope: no b_dec subtracted from the input
    acts = pre.relu() * (pre > t["threshold"])
    torch.testing.assert_close(sae.encode(x), acts, atol=1e-5, rtol=0)
    torch.testing.assert_close(sae(x), acts @ t["W_dec"] + t["b_dec"], atol=1e-5, rtol=0)
    assert torch.equal(mmlens.load_sae(tmp_path).encode(x), sae.encode(x))  # the folder works too


def _dictionary_learning_folder(folder: Path, dict_class: str, state: dict, **trainer) -> Path:
    folder.mkdir()
    torch.save(state, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": dict_class, "activation_dim": D_IN,
                                                                "dict_size": D_SAE, "layer": 3, **trainer}}))
    return folder


@torch.no_grad()
def test_dictionary_learning_classes(tmp_path: Path) -> None:
    """Each class's own encode/decode (dictionary_learning/dictionary.py, trainers/top_k.py,
    trainers/batch_top_k.py), written out on the nn.Linear weights it saves."""
    torch.manual_seed(1)
    x = torch.randn(6, D_IN)
    enc_w, enc_b, dec_w = torch.randn(D_SAE, D_IN), torch.randn(D_SAE) * 0.3, torch.randn(D_IN, D_SAE)
    bias = torch.randn(D_IN) * 0.3

    folder = _dictionary_learning_folder(tmp_path / "standard", "AutoEncoder", {
        "bias": bias, "encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w})
    sae = mmlens.load_sae(folder, hook_name="adapter.hook_out")
    f = torch.relu((x - bias) @ enc_w.T + enc_b)  # AutoEncoder.encode: relu(encoder(x - bias))
    torch.testing.assert_close(sae.encode(x), f, atol=1e-5, rtol=0)
    torch.testing.assert_close(sae(x), f @ dec_w.T + bias, atol=1e-5, rtol=0)  # decoder(f) + bias
    assert sae.cfg.metadata["layer"] == 3

    W_enc, W_dec, threshold = torch.randn(D_IN, D_SAE), torch.randn(D_SAE, D_IN), torch.rand(D_SAE)
    folder = _dictionary_learning_folder(tmp_path / "jump", "JumpReluAutoEncoder", {
        "W_enc": W_enc, "b_enc": enc_b, "W_dec": W_dec, "b_dec": bias, "threshold": threshold})
    sae = mmlens.load_sae(folder / "ae.pt")
    pre = x @ W_enc + enc_b  # apply_b_dec_to_input is False in dictionary-learning
    torch.testing.assert_close(sae.encode(x), torch.relu(pre * (pre > threshold)), atol=1e-5, rtol=0)

    k = 3
    topk_state = {"k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(-1.0), "encoder.weight": enc_w,
                  "encoder.bias": enc_b, "decoder.weight": dec_w, "b_dec": bias}
    sae = mmlens.load_sae(_dictionary_learning_folder(tmp_path / "topk", "AutoEncoderTopK", topk_state))
    post_relu = torch.relu((x - bias) @ enc_w.T + enc_b)
    top = post_relu.topk(k, dim=-1)
    f = torch.zeros_like(post_relu).scatter_(-1, top.indices, top.values)
    torch.testing.assert_close(sae.encode(x), f, atol=1e-5, rtol=0)
    assert sae.cfg.k == k

    batch_state = {**topk_state, "threshold": torch.tensor(0.4)}
    sae = mmlens.load_sae(_dictionary_learning_folder(tmp_path / "batch", "BatchTopKSAE", batch_state))
    # BatchTopKSAE.encode(use_threshold=True): post_relu * (post_relu > threshold)
    torch.testing.assert_close(sae.encode(x), post_relu * (post_relu > 0.4), atol=1e-5, rtol=0)
    assert sae.cfg.architecture == "batchtopk" and (sae.encode(x) == 0).any()


class SaeLensLikeConfig:
    """What a sae-lens 6 `SAEConfig` offers load_sae: `to_dict()` (the real class is tested
    where sae-lens is installed)."""

    def __init__(self, saved: dict):
        self.saved = saved

    def to_dict(self) -> dict:
        return dict(self.saved)


class SaeLensLikeSae(torch.nn.Module):
    def __init__(self, saved: dict, weights: dict):
        super().__init__()
        self.cfg = SaeLensLikeConfig(saved)
        for name, tensor in weights.items():
            self.register_parameter(name, torch.nn.Parameter(tensor))


@torch.no_grad()
def test_sae_lens_objects_are_converted() -> None:
    reference = random_sae("jumprelu")
    saved = {**reference.cfg.to_sae_lens_dict(), "metadata": {"hook_name": "blocks.0.hook_resid_post",
                                                              "sae_lens_version": "6.5.0"}}
    # a training JumpReLU keeps log_threshold
    weights = {k: v.clone() for k, v in reference.state_dict().items() if k != "threshold"}
    weights["log_threshold"] = reference.threshold.log()
    sae = mmlens.load_sae(SaeLensLikeSae(saved, weights))
    x = torch.randn(4, D_IN)
    torch.testing.assert_close(sae.encode(x), hand_encode(reference, x), atol=1e-6, rtol=0)
    assert sae.cfg.hook_name == "blocks.0.hook_resid_post"


def test_bad_files_are_refused_with_what_is_wrong(tmp_path: Path) -> None:
    sae = random_sae("jumprelu", metadata={"hook_name": "blocks.0.hook_resid_post"})
    sae.save(tmp_path / "ok")
    weights = load_file(tmp_path / "ok" / "sae_weights.safetensors")

    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "cfg.json").write_text((tmp_path / "ok" / "cfg.json").read_text())
    save_file({k: v for k, v in weights.items() if k not in ("threshold", "b_enc")}, tmp_path / "missing" / "sae_weights.safetensors")
    with pytest.raises(ModelLoadError, match="lack b_enc, threshold"):
        mmlens.load_sae(tmp_path / "missing")

    (tmp_path / "nan").mkdir()
    (tmp_path / "nan" / "cfg.json").write_text((tmp_path / "ok" / "cfg.json").read_text())
    save_file({**weights, "W_dec": weights["W_dec"].clone().index_fill_(0, torch.tensor([2]), float("nan"))},
              tmp_path / "nan" / "sae_weights.safetensors")
    with pytest.raises(ModelLoadError, match="NaN or infinite values: W_dec"):
        mmlens.load_sae(tmp_path / "nan")

    (tmp_path / "shape").mkdir()
    (tmp_path / "shape" / "cfg.json").write_text((tmp_path / "ok" / "cfg.json").read_text())
    save_file({**weights, "b_enc": torch.zeros(3)}, tmp_path / "shape" / "sae_weights.safetensors")
    with pytest.raises(ModelLoadError, match=r"b_enc \(3,\) \(expected \(10,\)\)"):
        mmlens.load_sae(tmp_path / "shape")

    cfg = json.loads((tmp_path / "ok" / "cfg.json").read_text())
    (tmp_path / "gated").mkdir()
    (tmp_path / "gated" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(ModelLoadError, match="unknown architecture 'gated'; known: standard, jumprelu, topk, batchtopk"):
        mmlens.load_sae(tmp_path / "gated")

    np.savez(tmp_path / "params.npz", W_enc=np.zeros((D_IN, D_SAE)), W_dec=np.zeros((D_SAE, D_IN)))
    with pytest.raises(ModelLoadError, match="lacks b_enc"):
        mmlens.load_sae(tmp_path / "params.npz")
    with pytest.raises(ModelLoadError, match="does not exist"):
        mmlens.load_sae(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="no SAE format recognised"):
        mmlens.load_sae(tmp_path / "ok" / "cfg.json")
    with pytest.raises(InputError, match="takes a folder, a file or a sae-lens SAE"):
        mmlens.load_sae(42)
    assert isinstance(mmlens.load_sae(tmp_path / "ok"), SAE)


def test_moving_an_sae_updates_its_config(tmp_path: Path) -> None:
    sae = random_sae("standard").to(torch.float64)
    assert sae.cfg.dtype == "float64"
    sae.save(tmp_path)
    assert mmlens.load_sae(tmp_path).W_enc.dtype == torch.float64


def test_the_config_is_read_without_the_weights(tmp_path: Path) -> None:
    """`read_sae_config` (the study's up-front check) gives the shape `load_sae` would, per format."""
    from mmlens.sae import SAE, SAEConfig
    from mmlens.sae.formats import read_sae_config

    torch.manual_seed(0)
    SAE(SAEConfig("topk", D_IN, D_SAE, k=2, metadata={"hook_name": "adapter.hook_out"})).save(tmp_path / "lens")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "params.npz", W_enc=rng.normal(size=(D_IN, D_SAE)).astype(np.float32),
             W_dec=rng.normal(size=(D_SAE, D_IN)).astype(np.float32), b_enc=np.zeros(D_SAE, np.float32),
             b_dec=np.zeros(D_IN, np.float32), threshold=np.zeros(D_SAE, np.float32))
    for source in (tmp_path / "lens", tmp_path / "params.npz", tmp_path):
        cfg, loaded = read_sae_config(source), mmlens.load_sae(source).cfg
        assert (cfg.architecture, cfg.d_in, cfg.d_sae, cfg.hook_name) == (loaded.architecture, loaded.d_in,
                                                                           loaded.d_sae, loaded.hook_name)
    with pytest.raises(ModelLoadError, match="does not exist"):
        read_sae_config(tmp_path / "missing")
