"""The headline statistics with penalties chosen on the training images against fixed penalties.

Run: `python benchmarks/penalties.py [--sizes 300 1200] [--model tiny-shapes-llava]`. For each
dataset size, the demo's sweep (ridge, seed 0, every site) with `alpha="cv"` over the default grid
and over a wider one, and with one fixed alpha for every site (1e-3, 1e-2, 1e-1): the drop at the adapter and the recovery at the last LLM
layer, each with its 95% interval and reading. docs/statistics.md quotes this table.
"""

from __future__ import annotations

import argparse

import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.findings import verdict, with_interval
from mmlens.probing import probe_sweep

ALPHAS = ("cv", "cv-wide", 1e-3, 1e-2, 1e-1)
WIDE = tuple(10.0**k for k in range(-8, 1))  # 1e-8 .. 1: the default grid's lower edge was chosen at some sites


def table_rows(model_name: str, size: int) -> list[str]:
    """One markdown row per penalty setting."""
    model = HookedMLLM.from_pretrained(model_name)
    scenes = load_segmentation("scenes", split="validation", n=size, image_size=64)
    rows = []
    for alpha in ALPHAS:
        with torch.no_grad():
            grid = {"alphas": WIDE} if alpha == "cv-wide" else {}
            summary = probe_sweep(model, scenes, probe="ridge", alpha="cv" if alpha == "cv-wide" else alpha,
                                  batch_size=32, progress=False, sensitivity=False, **grid).summary()
        cells = []
        for statistic in ("drop_at_adapter", "recovery_in_llm"):
            row = summary.loc[statistic]
            cells.append(f"{with_interval(row.value, row.low, row.high, signed=True)}, {verdict(row.low, row.high)}")
        name = {"cv": "chosen (cv, 1e-5 .. 1)", "cv-wide": "chosen (cv, 1e-8 .. 1)"}.get(alpha, alpha)
        rows.append(f"| {size} | {name} | {cells[0]} | {cells[1]} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1200])
    parser.add_argument("--model", default="tiny-shapes-llava")
    args = parser.parse_args()
    print("| scenes | ridge alpha | drop at the adapter | recovery at the last LLM layer |")
    print("| --- | --- | --- | --- |")
    for size in args.sizes:
        print("\n".join(table_rows(args.model, size)), flush=True)


if __name__ == "__main__":
    main()
