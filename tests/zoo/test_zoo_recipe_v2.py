"""The second-generation recipe: grounded questions read the pixel mask, the cached vision
features are the maths of LLaVA's own forward, and twins share stages a and b."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmlens.zoo import shipped_models
from mmlens.zoo.build import build_llava
from mmlens.zoo.evaluate import question_sets
from mmlens.zoo.scene_bank import SceneBank
from mmlens.zoo.scene_language import cell_contents, grounded_questions, vocabulary
from mmlens.zoo.train import Batcher, Recipe, Stage, projector_inputs, recipe_v2, train

CLASSES = [("red", "circle"), ("red", "square")]
NAMES = {1: "red circle", 2: "red square"}


def test_cell_contents_read_the_mask():
    mask = np.zeros((9, 9), dtype=np.uint8)
    mask[0:3, 0:3] = 1  # top left fully red circle
    mask[3:6, 6:9] = 2  # right cell fully red square
    mask[6, 3] = 1  # one pixel of the bottom cell: under the coverage threshold
    contents = cell_contents(mask, NAMES)
    assert contents["top left"] == "red circle"
    assert contents["right"] == "red square"
    assert contents["bottom"] == "nothing"
    assert contents["centre"] == "nothing"
    assert len(contents) == 9


def test_grounded_questions_answer_from_geometry():
    objects = [
        {"colour": "red", "shape": "circle", "x": 0.1, "y": 0.8},
        {"colour": "red", "shape": "square", "x": 0.9, "y": 0.2},
    ]
    mask = np.zeros((9, 9), dtype=np.uint8)
    seen = {}
    for seed in range(40):
        for qa in grounded_questions(objects, mask, np.random.default_rng(seed), CLASSES):
            seen[qa.question] = qa.answer
    assert seen["which is further left , the red circle or the red square ?"] == "red circle"
    assert seen["which is further left , the red square or the red circle ?"] == "red circle"
    assert seen["which is higher , the red circle or the red square ?"] == "red square"
    assert seen["how many objects are on the left ?"] == "one"
    assert seen["how many objects are at the top ?"] == "one"
    assert seen["what is at the centre ?"] == "nothing"  # an empty mask covers no cell


def test_relations_need_distinct_positions():
    objects = [
        {"colour": "red", "shape": "circle", "x": 0.50, "y": 0.5},
        {"colour": "red", "shape": "square", "x": 0.55, "y": 0.55},
    ]
    for seed in range(20):
        kinds = {qa.kind for qa in grounded_questions(objects, np.zeros((9, 9), np.uint8),
                                                       np.random.default_rng(seed), CLASSES)}
        assert "relation" not in kinds


def test_grounded_vocabulary_covers_every_text_and_keeps_basic_ids():
    bank = SceneBank.render(60, split="train", seed=0, image_size=48)
    words = vocabulary("grounded")
    assert words[: len(vocabulary("basic"))] == vocabulary("basic")
    for items in question_sets(bank, 0, "grounded").values():
        for _, question, answer in items:
            assert set(question.split()) | set(answer.split()) <= set(words), (question, answer)
    assert {"what_at", "relation", "count_region"} <= set(question_sets(bank, 0, "grounded"))
    assert not {"what_at", "relation", "count_region"} & set(question_sets(bank, 0, "basic"))


@torch.no_grad()
def test_cached_vision_features_give_llavas_own_forward():
    hf, processor = build_llava("clip", image_size=48, patch_size=4, vision_layers=2, vision_d_model=32,
                                llm_layers=2, llm_d_model=32, llm_d_mlp=64, words=vocabulary("grounded"))
    bank = SceneBank.render(5, split="train", seed=0, image_size=48)
    batcher = Batcher(processor, bank, 144, "causal")
    features = projector_inputs(hf, batcher, len(bank), batch=2)  # batches differ from the forward's
    index = np.array([4, 0, 2])
    batch = batcher.text_batch([(batcher.prompt_ids("describe the image .", True),
                                 batcher.answer_ids("a red circle at the top ."))] * 3)
    reference = hf(input_ids=batch["input_ids"], pixel_values=batcher.pixels(index),
                   attention_mask=batch["attention_mask"], labels=batch["labels"])
    cached = hf(inputs_embeds=batcher.merged_embeddings(hf, batch["input_ids"], features[index]),
                attention_mask=batch["attention_mask"], labels=batch["labels"])
    torch.testing.assert_close(cached.logits, reference.logits, atol=1e-5, rtol=1e-5)


def _toy(image_attention: str) -> Recipe:
    tiny = Stage(steps=2, batch=4, lr=1e-3)
    recipe = recipe_v2(image_attention)
    recipe.n_train, recipe.log_every, recipe.vision_from = 16, 1, None
    recipe.vision = recipe.language = recipe.align = recipe.finetune = tiny
    recipe.vision_d_model, recipe.llm_d_model, recipe.llm_d_mlp = 32, 32, 64
    recipe.vision_layers, recipe.llm_layers = 2, 2
    return recipe


def test_twins_share_stages_a_and_b(tmp_path):
    shared = tmp_path / "stages_ab.pt"
    causal = train(_toy("causal"), tmp_path / "causal", shared)
    twin = train(_toy("bidirectional"), tmp_path / "bidir", shared)
    assert not causal["stages_ab_shared"] and twin["stages_ab_shared"]
    assert twin["curves"]["a_vision"] == causal["curves"]["a_vision"]
    causal_weights = load_file(tmp_path / "causal" / "model.safetensors")
    twin_weights = load_file(tmp_path / "bidir" / "model.safetensors")
    tower = [name for name in causal_weights if "vision_tower" in name]
    assert tower and all(torch.equal(causal_weights[n], twin_weights[n]) for n in tower)  # frozen after a
    projector = [name for name in causal_weights if "multi_modal_projector" in name]
    assert any(not torch.equal(causal_weights[n], twin_weights[n]) for n in projector)  # c and d differ
    other = _toy("causal")
    other.llm_layers = 3
    with pytest.raises(ValueError, match="different recipe"):
        train(other, tmp_path / "other", shared)


def test_stage_a_can_come_from_a_trained_tower(tmp_path):
    recipe = recipe_v2("causal")  # the first generation's tower
    tiny = Stage(steps=1, batch=4, lr=1e-3)
    recipe.n_train, recipe.log_every = 8, 1
    recipe.language = recipe.align = recipe.finetune = tiny
    recipe.llm_layers, recipe.llm_d_model, recipe.llm_d_mlp = 1, 32, 64
    log = train(recipe, tmp_path / "v2")
    source = load_file(shipped_models()["tiny-shapes-llava"] / "model.safetensors")
    trained = load_file(tmp_path / "v2" / "model.safetensors")
    tower = [name for name in source if name.startswith("vision_tower.")]
    assert tower and all(torch.equal(trained[n], source[n]) for n in tower)
    assert log["curves"]["a_vision"] == json.loads(
        (shipped_models()["tiny-shapes-llava"] / "training_log.json").read_text())["curves"]["a_vision"]
    recipe.vision_d_model = 64
    with pytest.raises(ValueError, match="different vision tower"):
        train(recipe, tmp_path / "mismatch")



def test_step_costs_time_both_stages_of_a_recipe():
    from mmlens.zoo.step_cost import step_costs

    recipe = _toy("causal")
    recipe.image_size, recipe.patch_size = 24, 4
    cost = step_costs(recipe, repeats=1, prompt_tokens=4)
    assert cost["image_tokens"] == 36
    assert cost["a_step"] > 0 and cost["d_step"] > 0
