"""The shipped second-generation pair: loads offline with the v2 shape, answers better than the
majority baseline, and the twin runs its image tokens bidirectionally."""

from __future__ import annotations

import pytest
import torch

from mmlens import HookedMLLM
from mmlens.zoo import shipped_models
from mmlens.zoo.evaluate import qa_accuracy
from mmlens.zoo.scene_bank import SceneBank

V2_MODELS = {"tiny-shapes-llava-v2": "causal", "tiny-shapes-llava-v2-bidir": "bidirectional"}


@pytest.mark.parametrize("name", V2_MODELS)
def test_v2_ships_with_its_shape(monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = HookedMLLM.from_pretrained(name)
    cfg = model.cfg
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.n_image_tokens, cfg.n_layers) == (64, 8, 64, 6)
    assert model.image_attention == V2_MODELS[name]
    assert next(shipped_models()[name].glob("*.safetensors")).stat().st_size <= 25 * 2**20


@torch.no_grad()
def test_v2_answers_beat_the_majority_baseline():
    model = HookedMLLM.from_pretrained("tiny-shapes-llava-v2")
    held_out = SceneBank.render(40, split="validation", seed=0)
    table = qa_accuracy(model, held_out, SceneBank.render(300, split="train", seed=0), question_set="grounded")
    assert table.loc["all", "accuracy"] >= table.loc["all", "majority_accuracy"] + 0.15, table
    for kind in ("colour", "shape"):
        assert table.loc[kind, "accuracy"] >= table.loc[kind, "majority_accuracy"] + 0.25, table


@torch.no_grad()
def test_v2_twin_reads_ahead_among_image_tokens():
    model = HookedMLLM.from_pretrained("tiny-shapes-llava-v2-bidir")
    inputs = model.prepare(list(SceneBank.render(2, split="test", seed=0).images), "what is at the top left ?")
    _, cache = model.run_with_cache(inputs, names_filter="blocks.5.attn.hook_pattern")
    first = inputs.layout.positions(0)
    assert cache["blocks.5.attn.hook_pattern"][0, :, first[0], first[-1]].min() > 0
