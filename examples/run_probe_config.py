"""Run a probe sweep described by a YAML file (see examples/configs/) and save its results.

Run: `python examples/run_probe_config.py CONFIG.yaml`. Writes the table (CSV), the summary and
the curve (HTML, opens offline) into the config's `out` folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.probing import probe_sweep
from mmlens.viz import plot_probe_curve, save_figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", type=Path)
    config = yaml.safe_load(parser.parse_args().config.read_text())
    torch.set_grad_enabled(False)
    model = HookedMLLM.from_pretrained(config["model"], device=config.get("device"), dtype=config.get("dtype"))
    dataset_cfg = dict(config["dataset"])
    dataset = load_segmentation(dataset_cfg.pop("name"), **dataset_cfg)
    sweep_cfg = dict(config["sweep"])
    controls = sweep_cfg.pop("controls", None)
    sweep = probe_sweep(model, dataset, control=controls, **sweep_cfg)
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    sweep.table.to_csv(out / "probe_table.csv", index=False)
    sweep.summary().to_csv(out / "summary.csv")
    save_figure(plot_probe_curve(sweep), out / "curve.html")  # plotly.min.js beside it: opens offline
    print(sweep.summary().to_string(float_format="%.3f"))
    print("\n".join(sweep.findings()))
    print(f"results in {out}/")


if __name__ == "__main__":
    main()
