"""TransformerLens's Exploratory Analysis Demo, ported to an image question on the embedded model.

Run: `python examples/06_tl_exploratory_analysis.py [--pairs 8]`. Offline.

The demo's steps, with TL's own calls, changed only where images need it: the prompt is a
question about a scene ("what colour is the circle ?"), the answer pair is the two colours the
shape comes in, and the corrupted run asks the same question about a scene where the shape has
the other colour (so answers swap, as names swap in the demo's IOI prompts).
1. logit difference of the right over the wrong answer;
2. logit lens: the logit difference read from the accumulated residual at every layer;
3. direct logit attribution per layer, then per head;
4. where the top head looks on the image grid (TL's demo shows attention patterns);
5. residual patching by layer and position (image tokens grouped by grid row, since 64 single
   positions would each move little).
Invariants (checked by tests/test_example_06.py): the attributions sum to the logit difference,
the logit lens' last entry is the model's, the decomposition sums to the residual at image tokens.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import datasets
import torch
from torch import Tensor

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.interventions.patching import Patch, patch_conditions

COLOURS_OF = {"circle": ("red", "yellow"), "square": ("red", "green"), "triangle": ("blue", "green"), "ring": ("blue", "yellow")}


@dataclass
class Analysis:
    str_tokens: list[str]
    logit_diff: Tensor  # per pair
    lens_labels: list[str]
    lens: Tensor  # [layer] mean logit diff read at each accumulated residual
    layer_labels: list[str]
    layer_attr: Tensor  # [component] mean direct attribution
    head_attr: Tensor  # [layer, head]
    head_remainder: Tensor  # what heads leave out (embeddings, MLPs), mean
    top_head_cell: tuple[int, int, tuple[int, int]]  # layer, head, image cell it attends most
    image_decomposition_error: float
    patch_labels: list[str]
    patched: Tensor  # [layer, position group]: normalised logit diff, 0 = corrupted, 1 = clean


def question_pairs(n_pairs: int, seed: int = 0, pool: int = 400) -> tuple[list, list, list[str], list[str], list[str]]:
    """(clean images, corrupted images, questions, right answers, wrong answers): each question is
    about a shape that occurs once in both scenes, in the other colour in the corrupted one."""
    scenes = load_segmentation("scenes", split="validation", n=pool, seed=seed)
    lone: dict[tuple[str, str], list[int]] = {}
    for i, objects in enumerate(scenes["objects"]):
        shapes = [o["shape"] for o in objects]
        for o in objects:
            if shapes.count(o["shape"]) == 1 and o["shape"] in COLOURS_OF and o["visibility"] > 0.8:
                lone.setdefault((o["shape"], o["colour"]), []).append(i)
    clean, corrupted, questions, right, wrong = [], [], [], [], []
    for shape, (a, b) in COLOURS_OF.items():
        pairs = list(zip(lone.get((shape, a), []), lone.get((shape, b), [])))
        for i, j in pairs:
            for c, r, w in ((i, a, b), (j, b, a)):  # both directions: right and wrong answers swap
                clean.append(c)
                corrupted.append(j if c == i else i)
                questions.append(f"what colour is the {shape} ?")
                right.append(r)
                wrong.append(w)
    order = torch.randperm(len(clean), generator=torch.Generator().manual_seed(seed))[:n_pairs].tolist()
    images = scenes["image"]
    return ([images[clean[k]] for k in order], [images[corrupted[k]] for k in order],
            [questions[k] for k in order], [right[k] for k in order], [wrong[k] for k in order])


@torch.no_grad()
def analyse(model: HookedMLLM, n_pairs: int = 8, seed: int = 0, pool: int = 400) -> Analysis:
    """Steps 1-5 on `n_pairs` questions drawn from `pool` validation scenes."""
    clean_images, corrupted_images, questions, right, wrong = question_pairs(n_pairs, seed, pool)
    if len(questions) < n_pairs:
        raise ValueError(f"only {len(questions)} question pairs among {pool} scenes; raise pool")
    clean = model.prepare(clean_images, questions)
    corrupted = model.prepare(corrupted_images, questions)
    answer_tokens = torch.tensor([[model.to_single_token(r), model.to_single_token(w)] for r, w in zip(right, wrong)])
    rows = torch.arange(len(questions))

    def logit_diff(logits: Tensor) -> Tensor:
        return logits[rows, -1, answer_tokens[:, 0]] - logits[rows, -1, answer_tokens[:, 1]]

    # 1. logit difference
    logits, cache = model.run_with_cache(clean)
    diff = logit_diff(logits)
    directions = model.tokens_to_residual_directions(answer_tokens)  # [pair, 2, d_model]
    diff_directions = directions[:, 0] - directions[:, 1]

    def residual_stack_to_logit_diff(stack: Tensor) -> Tensor:
        scaled = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1)
        return (scaled * diff_directions).sum(-1).mean(-1)

    # 2. logit lens (TL's recipe: accumulated residual, final norm recomputed, then W_U)
    accumulated, lens_labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, apply_ln=True, return_labels=True)
    lens = ((accumulated @ model.W_U + model.b_U)[:, rows[:, None], answer_tokens] @ torch.tensor([1.0, -1.0])).mean(-1)

    # 3. direct logit attribution, per layer and per head
    per_layer, layer_labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    layer_attr = residual_stack_to_logit_diff(per_layer)
    per_head = cache.stack_head_results(layer=-1, pos_slice=-1, incl_remainder=True)
    head_terms = residual_stack_to_logit_diff(per_head)
    head_attr = head_terms[:-1].view(model.cfg.n_layers, model.cfg.n_heads)

    # 4. where the top head looks among the image tokens, from the last position
    layer, head = divmod(int(head_attr.abs().argmax()), model.cfg.n_heads)
    pattern = cache["pattern", layer][:, head, -1]  # [batch, key]
    on_image = clean.layout.by_image(pattern).mean(0)  # [n_tokens], averaged over images
    cell = tuple(int(v) for v in clean.layout.token_cells[int(on_image.argmax())])

    # the decomposition sums to the residual at image positions (hook_embed would miss by far)
    image = clean.layout.image_token_mask()
    full = cache.decompose_resid(layer=-1)
    error = float((full.sum(0)[image] - cache["resid_post", -1][image]).abs().max())

    # 5. residual patching by layer and position: text positions one by one, image rows grouped
    str_tokens = model.to_str_tokens(clean)[0]
    groups, patch_labels = _position_groups(clean, str_tokens)
    conditions = [Patch(f"blocks.{l}.hook_resid_pre", g) for l in range(model.cfg.n_layers) for g in groups]
    patched = patch_conditions(model, clean, corrupted, lambda acts, _: logit_diff(acts["logits"]), conditions).mean(-1)
    corrupted_diff = logit_diff(model(corrupted)).mean()
    normalised = ((patched - corrupted_diff) / (diff.mean() - corrupted_diff)).view(model.cfg.n_layers, len(groups))

    return Analysis(str_tokens, diff, lens_labels, lens, layer_labels, layer_attr, head_attr, head_terms[-1],
                    (layer, head, cell), error, patch_labels, normalised)


def _position_groups(inputs, str_tokens: list[str]) -> tuple[list[Tensor], list[str]]:
    layout, seq = inputs.layout, inputs.input_ids.shape[1]
    image = layout.image_token_mask()
    rows_of_grid = layout.token_cells[:, 0]
    groups, labels = [], []
    for position in range(seq):
        if image[0, position]:
            continue
        mask = torch.zeros_like(image)
        mask[:, position] = True
        groups.append(mask)
        labels.append(f"{position}:{str_tokens[position]}")
    for grid_row in range(layout.grid[0]):
        mask = torch.zeros_like(image)
        for span in layout.spans:
            mask[span.row, span.positions[rows_of_grid == grid_row]] = True
        groups.append(mask)
        labels.append(f"image row {grid_row}")
    return groups, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8, help="questions in the batch")
    parser.add_argument("--model", default="tiny-shapes-llava")
    args = parser.parse_args()
    datasets.disable_progress_bars()
    model = HookedMLLM.from_pretrained(args.model)
    result = analyse(model, args.pairs)
    print("prompt:", " ".join(t for t in result.str_tokens if not t.startswith("<img")), f"(+ {sum(t.startswith('<img') for t in result.str_tokens)} image tokens)")
    print(f"logit difference per question: {[round(v, 3) for v in result.logit_diff.tolist()]}, mean {result.logit_diff.mean():.3f}")
    print("\nlogit lens (mean logit difference read at each accumulated residual):")
    for label, value in zip(result.lens_labels, result.lens.tolist()):
        print(f"  {label:>10} {value:8.3f}")
    print("\ndirect logit attribution per layer:")
    for label, value in zip(result.layer_labels, result.layer_attr.tolist()):
        print(f"  {label:>10} {value:8.3f}")
    print(f"  {'sum':>10} {result.layer_attr.sum():8.3f}")
    print("\ndirect logit attribution per head (rows: layers):")
    print(result.head_attr.numpy().round(3))
    layer, head, cell = result.top_head_cell
    print(f"top head L{layer}H{head}: from the last token, it attends most to image cell (row, col) = {cell}")
    print(f"decomposition vs residual at image tokens: max |error| {result.image_decomposition_error:.2e}")
    print("\nresidual patching (clean -> corrupted), normalised logit difference by layer and position:")
    width = max(len(label) for label in result.patch_labels)
    for g, label in enumerate(result.patch_labels):
        print(f"  {label:>{width}} " + " ".join(f"{v:6.2f}" for v in result.patched[:, g].tolist()))


if __name__ == "__main__":
    main()
