"""The two mechanism studies on an embedded model: anchor knockout and the position study.

Run: `python examples/04_anchors_and_positions.py [--model tiny-shapes-llava] [--images 1000]`.
A probe sweep fits one probe per site; the anchor knockout blocks attention from the tokens the
probe already gets right (in the most confused class pairs) to every other image token and
measures the rest with the same probes, against a random same-class control; the position study
compares per-token accuracy along raster order under causal and bidirectional image attention.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.experiments import anchor_knockout, position_study
from mmlens.interventions import bidirectional_image_attention
from mmlens.probing import probe_sweep
from mmlens.viz import plot_attention_mask, save_figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-shapes-llava", help="or tiny-shapes-llava-bidir, a path, a hub id")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--probe", choices=["ridge", "logistic"], default="ridge",
                        help="ridge (default) is closed-form, its penalty cross-validated at little cost; "
                             "logistic refits per fold")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--docs-figures", type=Path, default=None,
                        help="also write small copies named after the model, sharing one plotly.min.js in that folder (docs/figures)")
    args = parser.parse_args()
    out = args.out or Path("runs/04_anchors_and_positions") / Path(args.model).name
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)

    model = HookedMLLM.from_pretrained(args.model)
    scenes = load_segmentation("scenes", split="validation", n=args.images, seed=0,
                                image_size=model.cfg.vision.image_size)
    sites = ["adapter.hook_out"] + [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]
    sweep = probe_sweep(model, scenes, sites=sites, probe=args.probe)

    knock = anchor_knockout(model, sweep, reference="adapter.hook_out", n_pairs=4, n_control=3)
    print("conflicting pairs at the adapter output:")
    print(knock.pairs[["name_a", "name_b", "confusion_rate"]].to_string(index=False, float_format="%.3f"))
    print(f"\nanchors per image {knock.anchors_per_image:.1f}, targets per image {knock.targets_per_image:.1f}, "
          f"control tokens that are anchors {knock.control_anchor_share:.2f}, "
          f"attention left on blocked edges {knock.blocked_mass}")
    effects = knock.effects[knock.effects.metric == "target_accuracy"]
    print(effects[["comparison", "site", "effect", "low", "high"]].to_string(index=False, float_format="%.3f"))
    print("\n".join(knock.findings()))
    knock.table.to_csv(out / "anchor_knockout.csv", index=False)
    knock.effects.to_csv(out / "anchor_knockout_effects.csv", index=False)
    figures = {"anchor_knockout": knock.figure("target_accuracy")}

    study = position_study(model, scenes, probe=args.probe)
    summary = study.summary[["condition", "site", "early_accuracy", "late_accuracy", "early_deficit",
                             "early_deficit_low", "early_deficit_high", "recovery_deficit",
                             "recovery_deficit_low", "recovery_deficit_high"]]
    print("\nposition study (object tokens; early = first quarter of raster positions):")
    print(summary.to_string(index=False, float_format="%.3f"))
    print(study.gains.to_string(index=False, float_format="%.3f"))
    print("\n".join(study.findings()))
    study.summary.to_csv(out / "position_summary.csv", index=False)
    study.gains.to_csv(out / "position_gains.csv", index=False)
    study.per_position.to_csv(out / "position_per_token.csv", index=False)
    figures |= study.figures()

    inputs = model.prepare([scenes[0]["image"]], "what is in the image ?")
    edit = bidirectional_image_attention(model, inputs)
    figures["bidirectional_mask"] = plot_attention_mask(edit.effective_mask(), inputs=inputs,
                                                        title="Bidirectional image attention: effective mask")
    for name, figure in figures.items():
        save_figure(figure, out / f"{name}.html")  # one plotly.min.js per folder: offline, not 4.8 MB each
        if args.docs_figures:
            save_figure(figure, args.docs_figures / f"{name}_{Path(args.model).name}.html")
    print(f"\ntables and figures written to {out}/ (the figures open offline)")


if __name__ == "__main__":
    main()
