"""How good the embedded model is: held-out question accuracy against a majority-answer
baseline, and per-token class probes on its vision layers against a random-weight twin.

The probe check asks whether image-level training put pixel-level information into the vision
tokens at all: the probe sweep over the vision layers, on the trained tower and on the same
architecture with random weights.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pandas as pd
import torch

from ..data import load_segmentation
from ..model import HookedMLLM
from ..probing import probe_sweep
from .scene_bank import SceneBank
from .scene_language import QUESTION_SETS, grounded_questions, questions

MAX_NEW_TOKENS = {"describe": 40, "objects": 16}


def question_sets(bank: SceneBank, seed: int, question_set: str = "basic") -> dict[str, list[tuple[int, str, str]]]:
    """Per kind, (scene index, question, answer) for every scene where the kind applies."""
    rng = np.random.default_rng(seed)
    by_kind: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for i, objects in enumerate(bank.objects):
        qas = questions(objects, rng, bank.classes)
        if question_set == "grounded":
            qas += grounded_questions(objects, bank.masks[i], rng, bank.classes)
        for qa in qas:
            by_kind[qa.kind].append((i, qa.question, qa.answer))
    return by_kind


@torch.no_grad()
def qa_accuracy(model: HookedMLLM, held_out: SceneBank, train: SceneBank, *, seed: int = 0, batch_size: int = 64,
                question_set: str = "basic") -> pd.DataFrame:
    """Exact-match accuracy per question kind of `question_set` ("basic" or "grounded"),
    beside always answering the kind's most common training answer."""
    majority = {
        kind: Counter(answer for _, _, answer in items).most_common(1)[0][0]
        for kind, items in question_sets(train, seed + 1, question_set).items()
    }
    rows = []
    for kind, items in question_sets(held_out, seed, question_set).items():
        correct = 0
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            inputs = model.prepare([held_out.images[i] for i, _, _ in chunk], [q for _, q, _ in chunk])
            answers = model.generate(inputs, max_new_tokens=MAX_NEW_TOKENS.get(kind, 6))
            correct += sum(" ".join(a.split()) == want for a, (_, _, want) in zip(answers, chunk))
        baseline = sum(answer == majority[kind] for _, _, answer in items)
        rows.append({"kind": kind, "n": len(items), "accuracy": correct / len(items),
                     "majority_answer": majority[kind], "majority_accuracy": baseline / len(items)})
    table = pd.DataFrame(rows).set_index("kind").loc[[k for k in QUESTION_SETS[question_set] if k in {r["kind"] for r in rows}]]
    total = table["n"].sum()
    table.loc["all"] = [total, (table.accuracy * table.n).sum() / total, "",
                        (table.majority_accuracy * table.n).sum() / total]
    return table


def vision_probe_check(model: HookedMLLM, *, n_images: int = 300, seed: int = 0) -> pd.DataFrame:
    """Per vision site, held-out token accuracy and mIoU of a ridge probe (penalty cross-validated on
    the training images): the trained model,
    the same architecture with random weights, and shuffled labels (a majority-class floor)."""
    scenes = load_segmentation("scenes", split="validation", n=n_images, seed=seed,
                               image_size=model.cfg.vision.image_size)
    sweep = probe_sweep(model, scenes, sites="vision", probe="ridge", seed=seed,
                        control=["random_init", "shuffled_labels"], progress=False)
    table = sweep.table.pivot(index=["depth", "site"], columns="condition", values=["token_accuracy", "miou"])
    table.columns = [f"{metric} ({condition})" for metric, condition in table.columns]
    return table.droplevel("depth")
