"""Measure a trained embedded model and print the tables of `docs/zoo.md`.

Run: `python -m mmlens.zoo.report [--model tiny-shapes-llava] [--figure docs/figures/zoo_training.html] [--no-vision-check]`.
Prints the training summary, held-out question accuracy against the majority baseline, and the
vision probe check (trained vs random weights); writes the training curves as a plotly figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from ..model import HookedMLLM
from ..model.loading import resolve_checkpoint
from .evaluate import qa_accuracy, vision_probe_check
from .scene_bank import SceneBank


def training_figure(log: dict) -> go.Figure:
    stages = list(log["curves"])
    fig = make_subplots(rows=1, cols=len(stages), subplot_titles=stages)
    for col, stage in enumerate(stages, start=1):
        curve = log["curves"][stage]
        steps = [point["step"] for point in curve]
        for key in curve[0]:
            if key != "step":
                fig.add_trace(go.Scatter(x=steps, y=[p[key] for p in curve], name=f"{stage} {key}", mode="lines"),
                              row=1, col=col)
        fig.update_xaxes(title_text="step", row=1, col=col)
    fig.update_layout(title=f"{log['recipe']['name']} training curves (loss per logged window)", height=350)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-shapes-llava")
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--n-held-out", type=int, default=300)
    parser.add_argument("--no-vision-check", action="store_true",
                        help="skip the vision probe check (a model whose tower another one shares: same figures)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    location, _ = resolve_checkpoint(args.model)
    log = json.loads((Path(location) / "training_log.json").read_text())
    recipe = log["recipe"]
    print(f"parameters: {log['parameters'] / 1e6:.2f}M; training seconds per stage: "
          + ", ".join(f"{k} {v:.0f}" for k, v in log["seconds"].items())
          + f" (total {sum(log['seconds'].values()) / 60:.1f} min)")
    if "cpu_seconds" in log:  # single-threaded CPU time: what the stage costs on an idle core
        print("CPU seconds per stage trained in this run: "
              + ", ".join(f"{k} {v:.0f}" for k, v in log["cpu_seconds"].items()))
    for stage, curve in log["curves"].items():
        first, last = curve[0], curve[-1]
        print(f"  {stage}: " + ", ".join(f"{k} {first[k]:.3f} -> {last[k]:.3f}" for k in first if k != "step"))
    model = HookedMLLM.from_pretrained(args.model)
    scenes = {"seed": recipe["seed"], "image_size": recipe["image_size"], "k": recipe["k"]}
    held_out = SceneBank.render(args.n_held_out, split="validation", **scenes)
    train = SceneBank.render(2000, split="train", **scenes)
    print("\nheld-out question accuracy (exact match) vs majority answer:")
    print(qa_accuracy(model, held_out, train, question_set=recipe.get("question_set", "basic")).to_markdown(floatfmt=".3f"))
    if not args.no_vision_check:
        print("\nper-patch class probes on held-out images, vision sites (logistic):")
        print(vision_probe_check(model, seed=recipe["seed"]).to_markdown(floatfmt=".3f"))
    if args.figure:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        training_figure(log).write_html(args.figure, include_plotlyjs="directory")
        print(f"\ntraining curves -> {args.figure}")


if __name__ == "__main__":
    main()
