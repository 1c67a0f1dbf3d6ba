"""The drop-off / recovery curve of the embedded model on synthetic scenes.

Run: `python examples/03_dropoff_recovery.py [--model tiny-shapes-llava] [--images 200] [--probe ridge|logistic]`.
A linear probe per site predicts each image token's class at every vision layer, at the
adapter, and at every LLM layer; the curve shows whether segmentation quality drops at the
adapter and recovers in the LLM, with a shuffled-label control and a random-weight model as
baselines. The findings printed at the end are worded from the bootstrap intervals.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.probing import probe_sweep, save_sweep
from mmlens.viz import plot_probe_curve, plot_probe_predictions, save_figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--probe", choices=["ridge", "logistic"], default="ridge",
                        help="ridge (default) is closed-form, its penalty cross-validated at little cost")
    parser.add_argument("--out", type=Path, default=Path("runs/03_dropoff_recovery"))
    parser.add_argument("--model", default="tiny-shapes-llava", help="or tiny-shapes-llava-bidir, a path, a hub id")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    model = HookedMLLM.from_pretrained(args.model)
    scenes = load_segmentation("scenes", split="validation", n=args.images, seed=0,
                                image_size=model.cfg.vision.image_size)
    sweep = probe_sweep(model, scenes, probe=args.probe, control=["shuffled_labels", "random_init"])

    table = sweep.table[["condition", "site", "token_accuracy", "pixel_accuracy", "miou", "miou_low", "miou_high"]]
    print(table[table.condition == "model"].to_string(index=False, float_format="%.3f"))
    print("\n" + sweep.summary().to_string(float_format="%.3f"))
    print("\n" + "\n".join(sweep.findings()))

    args.out.mkdir(parents=True, exist_ok=True)
    sweep.table.to_csv(args.out / "probe_table.csv", index=False)
    save_sweep(sweep, args.out / "sweep")  # load_sweep(args.out / "sweep", scenes) brings it back
    save_figure(plot_probe_curve(sweep, title=f"{args.model}: probe mIoU along the pipeline"), args.out / "curve.html")
    save_figure(plot_probe_predictions(sweep, example=0), args.out / "predictions.html")
    print(f"\ntable, saved sweep, curve and prediction maps written to {args.out}/ (the figures open offline)")


if __name__ == "__main__":
    main()
