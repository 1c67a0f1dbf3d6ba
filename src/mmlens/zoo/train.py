"""The recipe of the embedded model: a miniature of LLaVA's training, on synthetic scenes.

a. the vision encoder learns which object classes an image shows (an image-level label read
   from its CLS token; no pixel supervision anywhere); b. the LLM learns the scene language from
   descriptions alone; c. the projector alone learns image -> description with both frozen;
   d. projector and LLM are fine-tuned on questions about the scenes (which objects, where,
   what colour or shape, how many). Run `python -m mmlens.zoo.train --out DIR` (or `make zoo`);
   fixed seeds make reruns give a model of the same quality.

The second generation (`--recipe v2`) keeps the stages and changes what they see: 12 x 12 image
tokens, a deeper LLM, a longer captions-only projector stage, and instruction data with grounded
questions (what covers a cell of the mask, which object is further left, how many in a band).
Stages a and b do not depend on the image attention, so twins can share them (`--shared-stages`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from jaxtyping import Float
from safetensors.torch import load_file
from torch import nn

from ..model.loading import resolve_checkpoint
from ..model.runtime.attention_masks import image_attention_mask
from .build import build_llava
from .scene_bank import SceneBank
from .scene_language import describe, grounded_questions, questions, vocabulary

IGNORE = -100


@dataclass
class Stage:
    steps: int
    batch: int
    lr: float


@dataclass
class Recipe:
    name: str = "tiny-shapes-llava"
    seed: int = 0
    image_attention: str = "causal"  # or "bidirectional" among each image's tokens
    image_size: int = 64
    patch_size: int = 8
    k: int = 8
    vision_layers: int = 4
    vision_d_model: int = 128
    vision_heads: int = 4
    llm_layers: int = 4
    llm_d_model: int = 128
    llm_heads: int = 4
    llm_d_mlp: int = 344
    question_set: str = "basic"  # or "grounded" (adds what-at-cell, relation, count-in-band)
    # Stages c and d read the frozen tower's features from a table computed once (same maths,
    # a quarter less work per step at 144 image tokens).
    cache_vision_features: bool = False
    # Stage a taken from a trained checkpoint (a shipped name or folder) with the same tower,
    # instead of trained again: the tower is frozen after stage a, so it is all stage a leaves.
    vision_from: str | None = None
    n_train: int = 20000
    vision: Stage = field(default_factory=lambda: Stage(1500, 64, 1e-3))
    language: Stage = field(default_factory=lambda: Stage(1000, 64, 2e-3))
    align: Stage = field(default_factory=lambda: Stage(800, 32, 2e-3))
    finetune: Stage = field(default_factory=lambda: Stage(5000, 32, 1.5e-3))
    log_every: int = 50

    def shares_stages_ab_with(self, other: "Recipe") -> bool:
        """Whether stages a and b would train the same weights (they ignore image attention and
        the later stages' settings)."""
        later = ("name", "image_attention", "align", "finetune", "log_every", "cache_vision_features")
        mine, theirs = asdict(self), asdict(other)
        return all(mine[key] == theirs[key] for key in mine if key not in later)


def recipe_v2(image_attention: str = "causal", seed: int = 0) -> Recipe:
    """The second generation: the first generation's vision tower (its stage a), a 6-layer LLM,
    instruction data with grounded questions; sized for a CPU shared by several users."""
    return Recipe(
        name="tiny-shapes-llava-v2" + ("-bidir" if image_attention == "bidirectional" else ""),
        seed=seed, image_attention=image_attention, llm_layers=6,
        question_set="grounded", cache_vision_features=True, vision_from="tiny-shapes-llava", n_train=5000,
        language=Stage(300, 64, 2e-3), align=Stage(200, 32, 2e-3), finetune=Stage(500, 32, 1.5e-3), log_every=25,
    )


def recipe_v2_12x12(image_attention: str = "causal", seed: int = 0) -> Recipe:
    """The 12 x 12-token variant (48 px images, 4 px patches) with its own stage a: about twice
    the cost per step of `recipe_v2`; not shipped (see docs/zoo.md)."""
    recipe = recipe_v2(image_attention, seed)
    recipe.name = recipe.name.replace("-v2", "-v2-12x12")
    recipe.image_size, recipe.patch_size, recipe.vision_from, recipe.n_train = 48, 4, None, 10000
    recipe.vision = Stage(250, 64, 1e-3)
    return recipe


def load_vision_stage(recipe: Recipe, tower: nn.Module) -> tuple[list[dict], float]:
    """Copy the tower of `recipe.vision_from` (which must have this recipe's tower) into `tower`;
    returns that checkpoint's stage-a curve and seconds."""
    location, _ = resolve_checkpoint(recipe.vision_from)
    log = json.loads((Path(location) / "training_log.json").read_text())
    source = log["recipe"]
    same_tower = ("image_size", "patch_size", "k", "vision_layers", "vision_d_model", "vision_heads", "seed")
    if any(source[key] != getattr(recipe, key) for key in same_tower):
        raise ValueError(f"{recipe.vision_from} has a different vision tower ({ {k: source[k] for k in same_tower} })")
    weights = load_file(Path(location) / "model.safetensors")
    prefix = "vision_tower."
    tower.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    return log["curves"]["a_vision"], log["seconds"]["a_vision"]


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_stage(
    name: str,
    params: Iterable[nn.Parameter],
    loss_fn: Callable[[np.ndarray], tuple[torch.Tensor, dict[str, float]]],
    stage: Stage,
    n_examples: int,
    rng: np.random.Generator,
    log_every: int,
) -> list[dict]:
    """AdamW with warmup and cosine decay; returns the logged curve."""
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.01)
    warmup = max(1, stage.steps // 20)
    curve, running, start = [], [], time.perf_counter()
    for step in range(stage.steps):
        for group in optimizer.param_groups:
            group["lr"] = stage.lr * _schedule(step, stage.steps, warmup)
        loss, metrics = loss_fn(rng.integers(0, n_examples, stage.batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        running.append({"loss": loss.item(), **metrics})
        if (step + 1) % log_every == 0 or step + 1 == stage.steps:
            mean = {k: float(np.mean([r[k] for r in running])) for k in running[0]}
            curve.append({"step": step + 1, **mean})
            print(f"[{name}] step {step + 1}/{stage.steps} " + " ".join(f"{k} {v:.4f}" for k, v in mean.items())
                  + f" ({time.perf_counter() - start:.0f}s)", flush=True)
            running = []
    return curve


class Batcher:
    """Turns scenes and texts into LLaVA training batches (right padding, answer-only labels)."""

    def __init__(self, processor, bank: SceneBank, n_image_tokens: int, image_attention: str):
        self.processor, self.bank = processor, bank
        self.tokenizer = processor.tokenizer
        self.image_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.n_image_tokens = n_image_tokens
        self.image_attention = image_attention
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std).view(1, 3, 1, 1)

    def pixels(self, index: np.ndarray) -> torch.Tensor:
        """The processor's normalisation; images are already at the model's size (checked)."""
        x = torch.from_numpy(self.bank.images[index]).permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std

    @lru_cache(maxsize=None)
    def prompt_ids(self, question: str, with_image: bool) -> tuple[int, ...]:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        ids = self.tokenizer(text)["input_ids"]
        expanded = []
        for i in ids:  # the processor's own placeholder expansion
            expanded.extend([i] * self.n_image_tokens if i == self.image_id else [i])
        return tuple(expanded)

    @lru_cache(maxsize=None)
    def answer_ids(self, answer: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(answer, add_special_tokens=False)["input_ids"]) + (self.tokenizer.eos_token_id,)

    def text_batch(self, pairs: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> dict[str, torch.Tensor]:
        length = max(len(p) + len(a) for p, a in pairs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(pairs), length), pad)
        labels = torch.full((len(pairs), length), IGNORE)
        mask = torch.zeros(len(pairs), length, dtype=torch.long)
        for row, (p, a) in enumerate(pairs):
            seq = p + a
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, len(p) : len(seq)] = torch.tensor(a)
            mask[row, : len(seq)] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    def merged_embeddings(self, hf, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The LLM's input with the projected `features` at the image tokens, as LLaVA's forward
        merges them (`masked_scatter` over the placeholder positions)."""
        embeds = hf.get_input_embeddings()(input_ids)
        image = hf.model.multi_modal_projector(features).to(embeds.dtype)
        return embeds.masked_scatter((input_ids == self.image_id).unsqueeze(-1), image)

    def attention_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.image_attention == "causal":
            return batch["attention_mask"]
        return image_attention_mask(batch["input_ids"], batch["attention_mask"], self.image_id, self.n_image_tokens)


@torch.no_grad()
def projector_inputs(hf, batcher: Batcher, n: int, batch: int = 64) -> Float[torch.Tensor, "n tokens d_vision"]:
    """The vision features the projector reads (hidden state `vision_feature_layer`, CLS
    dropped under the "default" strategy) for the first `n` scenes of the bank."""
    config, chunks = hf.config, []
    for start in range(0, n, batch):
        pixels = batcher.pixels(np.arange(start, min(n, start + batch)))
        hidden = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states[config.vision_feature_layer]
        chunks.append(hidden[:, 1:] if config.vision_feature_select_strategy == "default" else hidden)
    return torch.cat(chunks)


def _load_shared_stages(recipe: Recipe, path: Path, hf: nn.Module, rng: np.random.Generator) -> dict | None:
    """Weights, random states, curves and timings after stage b, if `path` holds them for a
    recipe whose stages a and b are the same as this one's."""
    if not path.is_file():
        return None
    saved = torch.load(path, weights_only=False)
    if not recipe.shares_stages_ab_with(Recipe(**_stages(saved["recipe"]))):
        raise ValueError(f"{path} holds stages a and b of a different recipe; remove it or pick another folder")
    hf.load_state_dict(saved["weights"])
    rng.bit_generator.state = saved["numpy_rng"]
    torch.set_rng_state(saved["torch_rng"])
    print(f"stages a and b loaded from {path}", flush=True)
    return saved


def _stages(recipe: dict) -> dict:
    return {key: Stage(**value) if isinstance(value, dict) else value for key, value in recipe.items()}


def train(recipe: Recipe, out: Path, shared_stages: Path | None = None) -> dict:
    """Train `recipe` and save the checkpoint in `out`. With `shared_stages` (a file path),
    stages a and b are loaded from it when a twin saved them there, and saved there otherwise."""
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    hf, processor = build_llava(
        "clip",
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        vision_layers=recipe.vision_layers,
        vision_d_model=recipe.vision_d_model,
        vision_heads=recipe.vision_heads,
        llm_layers=recipe.llm_layers,
        llm_d_model=recipe.llm_d_model,
        llm_heads=recipe.llm_heads,
        llm_d_mlp=recipe.llm_d_mlp,
        words=vocabulary(recipe.question_set),
        attn_implementation="eager",
        seed=recipe.seed,
    )
    hf.train()
    print(f"rendering {recipe.n_train} training scenes", flush=True)
    bank = SceneBank.render(recipe.n_train, split="train", seed=recipe.seed, image_size=recipe.image_size, k=recipe.k)
    n_image_tokens = (recipe.image_size // recipe.patch_size) ** 2
    batcher = Batcher(processor, bank, n_image_tokens, recipe.image_attention)
    reference = processor(images=list(bank.images[:2]), text=["<image>"] * 2, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batcher.pixels(np.arange(2)), reference, atol=1e-5, rtol=0)
    tower, projector = hf.model.vision_tower, hf.model.multi_modal_projector
    lm = hf.model.language_model
    curves: dict[str, list[dict]] = {}
    timings: dict[str, float] = {}
    cpu_timings: dict[str, float] = {}  # CPU seconds: on a shared machine, closer to the idle cost

    def timed(name: str, fn: Callable[[], list[dict]]) -> None:
        start, cpu_start = time.perf_counter(), time.process_time()
        curves[name] = fn()
        timings[name] = time.perf_counter() - start
        cpu_timings[name] = time.process_time() - cpu_start

    # a. vision: which classes are present, from the CLS token (image-level only)
    head = nn.Linear(recipe.vision_d_model, recipe.k)

    def vision_loss(index):
        logits = head(tower(batcher.pixels(index)).pooler_output)
        target = bank.presence(index)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
        return loss, {"presence_acc": ((logits > 0).float() == target).float().mean().item()}

    shared = _load_shared_stages(recipe, shared_stages, hf, rng) if shared_stages else None
    if shared is not None:
        curves |= shared["curves"]
        timings |= shared["seconds"]
        cpu_timings |= shared["cpu_seconds"]
    elif recipe.vision_from:
        curves["a_vision"], timings["a_vision"] = load_vision_stage(recipe, tower)
        print(f"stage a: the vision tower of {recipe.vision_from}", flush=True)
    else:
        timed("a_vision", lambda: train_stage("a vision", [*tower.parameters(), *head.parameters()], vision_loss,
                                              recipe.vision, len(bank), rng, recipe.log_every))

    # b. language: descriptions, bare and in the chat format with the describe request
    def language_loss(index):
        pairs = []
        for i in index:
            text = describe(bank.objects[i])
            prompt = (batcher.tokenizer.bos_token_id,) if rng.random() < 0.5 else batcher.prompt_ids("describe the image .", False)
            pairs.append((prompt, batcher.answer_ids(text)))
        batch = batcher.text_batch(pairs)
        out = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, {}

    if shared is None:
        timed("b_language", lambda: train_stage("b language", [*lm.parameters(), *hf.lm_head.parameters()],
                                                language_loss, recipe.language, len(bank), rng, recipe.log_every))
        if shared_stages:
            shared_stages.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"recipe": asdict(recipe), "weights": hf.state_dict(), "numpy_rng": rng.bit_generator.state,
                        "torch_rng": torch.get_rng_state(), "curves": dict(curves), "seconds": dict(timings),
                        "cpu_seconds": dict(cpu_timings)},
                       shared_stages)

    def multimodal_loss(index, ask: Callable[[int], tuple[str, str]]):
        pairs = []
        for i in index:
            question, answer = ask(i)
            pairs.append((batcher.prompt_ids(question, True), batcher.answer_ids(answer)))
        batch = batcher.text_batch(pairs)
        if features is None:
            image = {"input_ids": batch["input_ids"], "pixel_values": batcher.pixels(index)}
        else:
            image = {"inputs_embeds": batcher.merged_embeddings(hf, batch["input_ids"], features[index])}
        out = hf(**image, attention_mask=batcher.attention_mask(batch), labels=batch["labels"])
        return out.loss, {}

    # c. alignment: only the projector learns, image -> description
    for p in [*tower.parameters(), *lm.parameters(), *hf.lm_head.parameters()]:
        p.requires_grad_(False)
    features = projector_inputs(hf, batcher, len(bank)) if recipe.cache_vision_features else None
    describe_task = lambda i: ("describe the image .", describe(bank.objects[i]))  # noqa: E731
    timed("c_align", lambda: train_stage("c align", projector.parameters(),
                                         lambda idx: multimodal_loss(idx, describe_task),
                                         recipe.align, len(bank), rng, recipe.log_every))

    # d. instruction tuning: projector + LLM on questions of every kind
    for p in [*lm.parameters(), *hf.lm_head.parameters()]:
        p.requires_grad_(True)

    def ask(i):
        qas = questions(bank.objects[i], rng, bank.classes)
        if recipe.question_set == "grounded":
            qas += grounded_questions(bank.objects[i], bank.masks[i], rng, bank.classes)
        qa = qas[int(rng.integers(len(qas)))]
        return qa.question, qa.answer

    timed("d_finetune", lambda: train_stage("d finetune", [*projector.parameters(), *lm.parameters(), *hf.lm_head.parameters()],
                                            lambda idx: multimodal_loss(idx, ask), recipe.finetune, len(bank), rng,
                                            recipe.log_every))

    hf.eval()
    for p in hf.parameters():
        p.requires_grad_(True)
    out.mkdir(parents=True, exist_ok=True)
    if recipe.image_attention != "causal":
        hf.config.mmlens_image_attention = recipe.image_attention
    hf.save_pretrained(out)
    processor.save_pretrained(out)
    log = {"recipe": asdict(recipe), "curves": curves, "seconds": timings, "cpu_seconds": cpu_timings,
           "parameters": sum(p.numel() for p in hf.parameters()), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "stages_ab_shared": shared is not None}
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-attention", choices=["causal", "bidirectional"], default="causal")
    parser.add_argument("--recipe", choices=["v1", "v2", "v2-12x12"], default="v1",
                        help="v1: tiny-shapes-llava; v2: tiny-shapes-llava-v2 (6 LLM layers, grounded questions); "
                             "v2-12x12: v2 with 12 x 12 image tokens and its own stage a")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (quick trials)")
    parser.add_argument("--shared-stages", type=Path, default=None,
                        help="file holding stages a and b: loaded when a twin saved them, saved otherwise")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.recipe.startswith("v2"):
        recipe = (recipe_v2 if args.recipe == "v2" else recipe_v2_12x12)(args.image_attention, args.seed)
    else:
        recipe = Recipe(seed=args.seed, image_attention=args.image_attention)
        if args.image_attention == "bidirectional":
            recipe.name = "tiny-shapes-llava-bidir"
    for stage in (recipe.vision, recipe.language, recipe.align, recipe.finetune):
        stage.steps = max(1, int(stage.steps * args.scale))
    torch.set_num_threads(args.threads or max(1, torch.get_num_threads()))
    start, cpu_start = time.perf_counter(), time.process_time()
    log = train(recipe, args.out, args.shared_stages)
    print(f"done in {time.perf_counter() - start:.0f}s wall, {time.process_time() - cpu_start:.0f}s CPU; "
          f"{log['parameters'] / 1e6:.2f}M parameters -> {args.out}")


if __name__ == "__main__":
    main()
