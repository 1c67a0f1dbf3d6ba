"""How good the embedded model is: held-out question accuracy against a majority-answer
baseline, and per-token class probes on its vision layers against a random-weight twin.

The probe check asks whether image-level training put pixel-level information into the vision
tokens at all: a logistic probe per vision layer predicts each patch's majority class, on the
trained tower and on the same architecture with random weights.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pandas as pd
import torch

from ..data.token_labels import token_labels
from ..model import HookedMLLM
from ..probing.logistic import fit_logistic  # noqa: F401
from .scene_bank import SceneBank
from .scene_language import QUESTION_TYPES, questions

MAX_NEW_TOKENS = {"describe": 40, "objects": 16}


def question_sets(bank: SceneBank, seed: int) -> dict[str, list[tuple[int, str, str]]]:
    """Per kind, (scene index, question, answer) for every scene where the kind applies."""
    rng = np.random.default_rng(seed)
    by_kind: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for i, objects in enumerate(bank.objects):
        for qa in questions(objects, rng, bank.classes):
            by_kind[qa.kind].append((i, qa.question, qa.answer))
    return by_kind


@torch.no_grad()
def qa_accuracy(model: HookedMLLM, held_out: SceneBank, train: SceneBank, *, seed: int = 0, batch_size: int = 64) -> pd.DataFrame:
    """Exact-match accuracy per question kind, beside always answering the kind's most common
    training answer."""
    majority = {
        kind: Counter(answer for _, _, answer in items).most_common(1)[0][0]
        for kind, items in question_sets(train, seed + 1).items()
    }
    rows = []
    for kind, items in question_sets(held_out, seed).items():
        correct = 0
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            inputs = model.prepare([held_out.images[i] for i, _, _ in chunk], [q for _, q, _ in chunk])
            answers = model.generate(inputs, max_new_tokens=MAX_NEW_TOKENS.get(kind, 6))
            correct += sum(" ".join(a.split()) == want for a, (_, _, want) in zip(answers, chunk))
        baseline = sum(answer == majority[kind] for _, _, answer in items)
        rows.append({"kind": kind, "n": len(items), "accuracy": correct / len(items),
                     "majority_answer": majority[kind], "majority_accuracy": baseline / len(items)})
    table = pd.DataFrame(rows).set_index("kind").loc[[k for k in QUESTION_TYPES if k in {r["kind"] for r in rows}]]
    total = table["n"].sum()
    table.loc["all"] = [total, (table.accuracy * table.n).sum() / total, "",
                        (table.majority_accuracy * table.n).sum() / total]
    return table


@torch.no_grad()
def _vision_features(model: HookedMLLM, bank: SceneBank, index: np.ndarray, batch_size: int = 64):
    layers = model.cfg.vision.n_layers
    names = ["vision.blocks.0.hook_resid_pre"] + [f"vision.blocks.{i}.hook_resid_post" for i in range(layers)]
    feats = {n: [] for n in names}
    for start in range(0, len(index), batch_size):
        chunk = index[start : start + batch_size]
        inputs = model.prepare([bank.images[i] for i in chunk], "describe the image .")
        _, cache = model.run_with_cache(inputs, names_filter=names)
        positions = inputs.layout.patch_positions
        for n in names:
            feats[n].append(cache[n][:, positions].flatten(0, 1))
    return names, {n: torch.cat(v) for n, v in feats.items()}


def vision_probe_check(trained: HookedMLLM, random_init: HookedMLLM, bank: SceneBank, *, n_train: int = 300, n_test: int = 200) -> pd.DataFrame:
    """Per vision layer, held-out per-patch class accuracy of a logistic probe, trained model vs
    random weights, with the majority-class rate."""
    index = np.arange(n_train + n_test)
    masks = torch.from_numpy(bank.masks[index])
    size = trained.cfg.vision.image_size
    layout = trained.prepare([bank.images[0]], "describe the image .").layout
    labels = token_labels(masks, layout, n_classes=bank.k + 1, stage="vision")
    valid = labels.valid.flatten()
    y = labels.labels.flatten()
    is_train = torch.zeros(len(index), labels.labels.shape[1], dtype=torch.bool)
    is_train[:n_train] = True
    is_train = is_train.flatten()
    train_rows, test_rows = valid & is_train, valid & ~is_train
    majority = torch.bincount(y[train_rows]).argmax()
    objects = test_rows & (y != 0)  # background is most tokens; objects are the hard part
    rows = []
    for label, model in (("trained", trained), ("random_init", random_init)):
        names, feats = _vision_features(model, bank, index)
        for depth, name in enumerate(names):
            probe = fit_logistic(feats[name][train_rows], y[train_rows], bank.k + 1)
            correct = probe.predict(feats[name]) == y
            rows.append({"model": label, "layer": depth, "hook": name,
                         "all tokens": correct[test_rows].float().mean().item(),
                         "object tokens": correct[objects].float().mean().item()})
    table = pd.DataFrame(rows).pivot(index=["layer", "hook"], columns="model", values=["all tokens", "object tokens"])
    table[("all tokens", "majority class")] = (y[test_rows] == majority).float().mean().item()
    if size != bank.images.shape[1]:
        raise ValueError(f"scenes are {bank.images.shape[1]} px but the model takes {size} px")
    return table.sort_index(axis=1)
