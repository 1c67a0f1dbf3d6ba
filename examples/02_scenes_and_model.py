"""Make a synthetic scene, show it with its mask, and ask the embedded model about it.

Run: `python examples/02_scenes_and_model.py [--seed N] [--out runs/02_scenes_and_model/scene.html]`.
Offline: the scene is generated and `tiny-shapes-llava` ships inside the package.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation, segmentation_info
from mmlens.viz import plot_image_and_mask, save_figure
from mmlens.zoo.scene_language import describe

QUESTIONS = [
    "describe the image .",
    "what objects are in the image ?",
    "how many objects are there ?",
    "what colour is the circle ?",
    "where is the red square ?",
]


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
    # one colour per class (red_circle is red) and row 0 on top in both panels
    save_figure(plot_image_and_mask(image, mask, info.class_names, title=f"scene {example['id']}"), args.out)
    present = [info.class_names[c] for c in np.unique(mask)]
    print(f"scene {example['id']}: classes {present}; image and mask written to {args.out}")
    print(f"ground truth: {describe(example['objects'])}")

    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    inputs = model.prepare([image] * len(QUESTIONS), QUESTIONS)
    for question, answer in zip(QUESTIONS, model.generate(inputs, max_new_tokens=40)):
        print(f"  Q: {question:<36} A: {answer}")


if __name__ == "__main__":
    main()
