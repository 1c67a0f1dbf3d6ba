"""What one training step of each zoo recipe costs, in CPU seconds of one thread.

On a machine shared with other jobs, wall time says more about the neighbours than about the
recipe; the CPU time of a single-threaded step is close to its wall time on an idle core. Run:
`python -m mmlens.zoo.step_cost [--repeats 3]` (random pixels and tokens: only the shapes matter).
"""

from __future__ import annotations

import argparse
import time

import torch

from .build import build_llava
from .scene_language import vocabulary
from .train import Recipe, recipe_v2, recipe_v2_12x12


def _cpu_seconds(step, repeats: int) -> float:
    step()  # warm-up: allocations and kernel selection
    start = time.process_time()
    for _ in range(repeats):
        step()
    return (time.process_time() - start) / repeats


def step_costs(recipe: Recipe, repeats: int = 3, prompt_tokens: int = 24) -> dict[str, float]:
    """CPU seconds of a stage-a step (tower forward and backward) and of a stage-d step
    (LLM and projector forward and backward, tower frozen; from cached features when the
    recipe caches them)."""
    hf, processor = build_llava("clip", image_size=recipe.image_size, patch_size=recipe.patch_size,
                                vision_layers=recipe.vision_layers, vision_d_model=recipe.vision_d_model,
                                vision_heads=recipe.vision_heads, llm_layers=recipe.llm_layers,
                                llm_d_model=recipe.llm_d_model, llm_heads=recipe.llm_heads,
                                llm_d_mlp=recipe.llm_d_mlp, words=vocabulary(recipe.question_set))
    tower = hf.model.vision_tower
    n_tokens = (recipe.image_size // recipe.patch_size) ** 2
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    generator = torch.Generator().manual_seed(0)

    def pixels(batch: int) -> torch.Tensor:
        return torch.randn(batch, 3, recipe.image_size, recipe.image_size, generator=generator)

    def vision_step() -> None:
        tower(pixels(recipe.vision.batch)).pooler_output.sum().backward()

    batch = recipe.finetune.batch
    ids = torch.randint(5, len(processor.tokenizer), (batch, n_tokens + prompt_tokens), generator=generator)
    ids[:, 4 : 4 + n_tokens] = image_id
    features = torch.randn(batch, n_tokens, recipe.vision_d_model, generator=generator)

    def finetune_step() -> None:
        if recipe.cache_vision_features:
            embeds = hf.get_input_embeddings()(ids)
            image = hf.model.multi_modal_projector(features)
            embeds = embeds.masked_scatter((ids == image_id).unsqueeze(-1), image)
            hf(inputs_embeds=embeds, labels=ids).loss.backward()
        else:
            hf(input_ids=ids, pixel_values=pixels(batch), labels=ids).loss.backward()

    vision = _cpu_seconds(vision_step, repeats)
    tower.requires_grad_(False)
    return {"a_step": vision, "d_step": _cpu_seconds(finetune_step, repeats), "image_tokens": n_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, recipe in {"v1": Recipe(), "v2": recipe_v2(), "v2-12x12": recipe_v2_12x12()}.items():
        cost = step_costs(recipe, args.repeats)
        print(f"{name:9s} {cost['image_tokens']:4d} image tokens, {recipe.llm_layers} LLM layers: "
              f"stage a {cost['a_step']:.2f} s/step (batch {recipe.vision.batch}), "
              f"stage d {cost['d_step']:.2f} s/step (batch {recipe.finetune.batch}) CPU", flush=True)


if __name__ == "__main__":
    main()
