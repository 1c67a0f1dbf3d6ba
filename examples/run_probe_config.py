"""Run only the probe sweep of a study config (examples/configs/*.yaml) and save its results.

The configs are `mmlens study` configs: `mmlens study CONFIG.yaml` runs every enabled stage into a
resumable run folder with a report. This script is the same sweep in a few lines of Python (the
config's `probe` section, its first seed), for reading or adapting: it writes the table (CSV), the
summary and the curve (HTML, opens offline) into the config's `out` folder.

Run: `python examples/run_probe_config.py CONFIG.yaml [--images N] [--out DIR]`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.probing import probe_sweep
from mmlens.runs import load_config
from mmlens.runs.probe_stage import probe_settings
from mmlens.viz import plot_probe_curve, save_figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="a study config (YAML), checked as `mmlens study --check` does")
    parser.add_argument("--images", type=int, default=None, help="use only this many images (default: dataset.n)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the config's out)")
    args = parser.parse_args()
    config = load_config(args.config)  # a ConfigError lists every problem before anything loads
    torch.set_grad_enabled(False)
    model = HookedMLLM.from_pretrained(config.model, device=config.device, dtype=config.dtype)
    data = config.dataset
    dataset = load_segmentation(data.name, path=data.path, split=data.split, n=args.images or data.n, seed=data.seed,
                                image_size=data.image_size)
    probe = config.probe
    sweep = probe_sweep(model, dataset, sites=probe.sites, probe=probe.kind, control=probe.controls,
                        seed=config.seeds[0], n_boot=config.n_boot, recovery_layer=probe.recovery_layer,
                        sensitivity=probe.sensitivity, **probe_settings(config))
    out = args.out or Path(config.out or "runs/probe_sweep")
    out.mkdir(parents=True, exist_ok=True)
    sweep.table.to_csv(out / "probe_table.csv", index=False)
    sweep.summary().to_csv(out / "summary.csv")
    save_figure(plot_probe_curve(sweep), out / "curve.html")  # plotly.min.js beside it: opens offline
    print(sweep.summary().to_string(float_format="%.3f"))
    print("\n".join(sweep.findings()))
    print(f"results in {out}/")


if __name__ == "__main__":
    main()
