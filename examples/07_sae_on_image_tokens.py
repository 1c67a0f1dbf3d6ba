"""Train a sparse autoencoder on the embedded model's image tokens, find the features that align
with each shape class, and ablate them to see what a probe loses.

Run: `python examples/07_sae_on_image_tokens.py [--images 96] [--seed 0] [--save runs/07_sae]`.
Offline and on CPU in well under a minute: the scenes are generated and `tiny-shapes-llava` ships
inside the package. The SAE (TopK, SAELens's objective) trains at `adapter.hook_out` on three
quarters of the scenes; features are chosen on those and scored on the held-out quarter, and every
interval is a bootstrap over held-out scenes (docs/sae.md explains each number).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.findings import effect_phrase, with_interval
from mmlens.sae import sae_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96, help="scenes, split 3:1 into training and held-out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=4, help="active features per token (TopK)")
    parser.add_argument("--d-sae", type=int, default=128, help="features in the dictionary")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--save", type=Path, default=None, help="folder to save the SAE in (SAELens's format)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the dictionary is tiny: one thread is fastest, and leaves the rest of the machine free

    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    scenes = load_segmentation("scenes", split="train", n=args.images, seed=args.seed)
    study = sae_study(model, scenes, "adapter.hook_out", architecture="topk", k=args.k, d_sae=args.d_sae,
                      steps=args.steps, batch_size=256, lr=2e-3, seed=args.seed)

    held = study.reconstruction.iloc[0]
    print(f"SAE at adapter.hook_out ({args.d_sae} features, k={args.k}), trained on {held['n_train_images']} scenes: "
          f"explains {held['variance_explained']:.3f} of the variance of {held['n_test_tokens']} held-out image "
          f"tokens ({held['n_test_images']} scenes); {held['dead_features']} features never fire on them\n")

    print("features aligned with each class (chosen on training scenes, IoU of the map on held-out ones):")
    for _, row in study.alignment.iterrows():
        print(f"  {row['class']:<15} feature {row['feature']:>3}: IoU {with_interval(row['iou'], row['iou_low'], row['iou_high'])}"
              f"  random features {with_interval(row['random_iou'], row['random_iou_low'], row['random_iou_high'])}")

    print("\nzeroing the aligned feature at the image tokens (spliced with the error term), against a feature "
          "as frequent:\n  the probe's held-out class IoU drop, aligned minus matched (paired)")
    for _, row in study.ablation.iterrows():
        print(f"  {row['class']:<15} clean {row['clean_iou']:.3f}  drop {row['drop']:+.3f} vs {row['matched_drop']:+.3f}  "
              f"difference {effect_phrase(row['difference'], row['difference_low'], row['difference_high'], signed=True)}")

    strongest = study.ablation.sort_values("difference", ascending=False).iloc[0]
    print(f"\nablating feature {strongest['feature']} costs the probe {strongest['drop']:.3f} of its "
          f"{strongest['class']} IoU (of {strongest['clean_iou']:.3f})")
    if args.save is not None:
        study.sae.save(args.save)
        print(f"SAE saved to {args.save} (cfg.json + sae_weights.safetensors: mmlens.load_sae or sae-lens reads it)")
    with pd.option_context("display.width", 200):
        print(f"\ntraining log (last rows):\n{study.training.log.tail(3).to_string(index=False)}")


if __name__ == "__main__":
    main()
