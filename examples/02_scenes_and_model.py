"""Make a synthetic scene, show it with its mask, and ask the embedded model about it.

Run: `python examples/02_scenes_and_model.py [--seed N] [--out runs/02_scenes_and_model/scene.html]`.
Offline: the scene is generated and `tiny-shapes-llava` ships inside the package.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from mmlens import HookedMLLM
from mmlens.data import load_segmentation, segmentation_info
from mmlens.viz import save_figure
from mmlens.zoo.scene_language import describe

QUESTIONS = [
    "describe the image .",
    "what objects are in the image ?",
    "how many objects are there ?",
    "what colour is the circle ?",
    "where is the red square ?",
]


def show(image: np.ndarray, mask: np.ndarray, class_names: tuple[str, ...], path: Path) -> None:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("image", "mask"))
    fig.add_trace(go.Image(z=image), row=1, col=1)
    labels = np.array(class_names, dtype=object)[mask]
    fig.add_trace(
        go.Heatmap(z=mask[::-1], text=labels[::-1], hovertemplate="%{text}<extra></extra>",
                   colorscale="Turbo", showscale=False),
        row=1, col=2,
    )
    fig.update_yaxes(scaleanchor="x2", row=1, col=2)
    save_figure(fig, path)  # plotly.min.js is written once beside it: opens offline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("runs/02_scenes_and_model/scene.html"),
                        help="figure file (plotly.min.js is written beside it)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    scenes = load_segmentation("scenes", split="test", n=1, seed=args.seed)
    info = segmentation_info(scenes)
    example = scenes[0]
    image, mask = np.array(example["image"]), np.array(example["mask"])
    show(image, mask, info.class_names, args.out)
    present = [info.class_names[c] for c in np.unique(mask)]
    print(f"scene {example['id']}: classes {present}; image and mask written to {args.out}")
    print(f"ground truth: {describe(example['objects'])}")

    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    inputs = model.prepare([image] * len(QUESTIONS), QUESTIONS)
    for question, answer in zip(QUESTIONS, model.generate(inputs, max_new_tokens=40)):
        print(f"  Q: {question:<36} A: {answer}")


if __name__ == "__main__":
    main()
