"""The embedded model: ships with the package, loads offline, answers better than the majority
baseline; its training recipe runs end to end (at toy scale here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmlens import HookedMLLM
from mmlens.zoo import shipped_models
from mmlens.zoo.evaluate import qa_accuracy
from mmlens.zoo.scene_bank import SceneBank
from mmlens.zoo.train import Recipe, Stage, train


@pytest.fixture(scope="module")
def shapes_model():
    return HookedMLLM.from_pretrained("tiny-shapes-llava")


def test_loads_offline_by_name(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "tiny-shapes-llava" in shipped_models()
    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    cfg = model.cfg
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.n_image_tokens) == (64, 8, 64)
    assert cfg.adapter.feature_layers == (cfg.vision.n_layers - 1,)  # LLaVA-1.5's -2
    weights = next(shipped_models()["tiny-shapes-llava"].glob("*.safetensors"))
    assert weights.stat().st_size <= 25 * 2**20


@torch.no_grad()
def test_answers_beat_the_majority_baseline(shapes_model):
    held_out = SceneBank.render(40, split="validation", seed=0)
    train_bank = SceneBank.render(300, split="train", seed=0)
    table = qa_accuracy(shapes_model, held_out, train_bank)
    for kind in ("colour", "count", "shape"):
        row = table.loc[kind]
        assert row.accuracy >= row.majority_accuracy + 0.25, table
    assert table.loc["all", "accuracy"] >= table.loc["all", "majority_accuracy"] + 0.25


@torch.no_grad()
def test_prepare_matches_training_pixels(shapes_model):
    from mmlens.zoo.train import Batcher

    bank = SceneBank.render(3, split="test", seed=0)
    batcher = Batcher(shapes_model.processor, bank, shapes_model.cfg.n_image_tokens, "causal")
    inputs = shapes_model.prepare(list(bank.images), "describe the image .")
    torch.testing.assert_close(inputs.pixel_values, batcher.pixels(np.arange(3)))
    prompt = batcher.prompt_ids("describe the image .", True)
    assert inputs.input_ids[0, -len(prompt):].tolist() == list(prompt)


@pytest.mark.parametrize("image_attention", ["causal", "bidirectional"])
def test_recipe_runs_end_to_end_at_toy_scale(tmp_path, image_attention):
    tiny = Stage(steps=2, batch=4, lr=1e-3)
    recipe = Recipe(n_train=16, vision=tiny, language=tiny, align=tiny, finetune=tiny, log_every=1,
                    image_attention=image_attention,
                    vision_d_model=32, llm_d_model=32, llm_d_mlp=64, vision_layers=2, llm_layers=2)
    log = train(recipe, tmp_path)
    assert set(log["curves"]) == {"a_vision", "b_language", "c_align", "d_finetune"}
    model = HookedMLLM.from_pretrained(tmp_path)
    assert model.image_attention == image_attention
    answers = model.generate(model.prepare([SceneBank.render(1, split="test", seed=0).images[0]], "how many objects are there ?"), 3)
    assert isinstance(answers[0], str)


def test_bidirectional_twin_ships_and_runs_bidirectionally(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = HookedMLLM.from_pretrained("tiny-shapes-llava-bidir")
    assert model.image_attention == "bidirectional"
    bank = SceneBank.render(2, split="test", seed=0)
    inputs = model.prepare(list(bank.images), "what colour is the circle ?")
    _, cache = model.run_with_cache(inputs, names_filter="blocks.0.attn.hook_pattern")
    first = inputs.layout.positions(0)
    assert cache["blocks.0.attn.hook_pattern"][0, :, first[0], first[-1]].min() > 0  # reads ahead
