"""The causal and bidirectional twins compared the only way that supports a contrast: paired.

Run: `python benchmarks/twins.py [--sizes 300 1200]`. For each pair of embedded twins (v1 and v2)
and dataset size, both models' probe sweeps on the same scenes (the demo's settings: ridge,
penalties cross-validated on the training images, seed 0, the re-drawn-LLM control), then
`compare_sweeps`: each model's drop and recovery with its own interval, and the difference
(causal minus bidirectional) with its paired 95% bootstrap interval over the shared test images.
docs/statistics.md quotes this table.
"""

from __future__ import annotations

import argparse

import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.findings import with_interval
from mmlens.probing import compare_sweeps, probe_sweep

PAIRS = {"v1": ("tiny-shapes-llava", "tiny-shapes-llava-bidir"),
         "v2": ("tiny-shapes-llava-v2", "tiny-shapes-llava-v2-bidir")}


def table_rows(pair: str, size: int) -> list[str]:
    """The markdown rows of one pair at one size (tests check docs/statistics.md against them)."""
    scenes = load_segmentation("scenes", split="validation", n=size, image_size=64)
    with torch.no_grad():
        sweeps = [probe_sweep(HookedMLLM.from_pretrained(n), scenes, probe="ridge", batch_size=32,
                              control="random_llm", progress=False) for n in PAIRS[pair]]
    table = compare_sweeps(*sweeps, names=("causal", "bidirectional"))
    rows = []
    for statistic in ("drop_at_adapter", "recovery_in_llm"):
        own = [s.summary().loc[statistic] for s in sweeps]
        cells = [with_interval(o.value, o.low, o.high, signed=True) for o in own]
        row = table.loc[statistic]
        diff = with_interval(row.difference, row.low, row.high, signed=True) + f", {row.reading}"
        rows.append(f"| {pair} | {size} | {statistic} | {cells[0]} | {cells[1]} | {diff} |")
    over = [s.summary().loc["recovery_over_random_llm"] for s in sweeps]
    cells = [with_interval(o.value, o.low, o.high, signed=True) for o in over]
    rows.append(f"| {pair} | {size} | recovery_over_random_llm | {cells[0]} | {cells[1]} | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1200])
    args = parser.parse_args()
    print("| pair | scenes | statistic | causal | bidirectional | causal - bidirectional (paired) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        for pair in PAIRS:
            print("\n".join(table_rows(pair, size)), flush=True)


if __name__ == "__main__":
    main()
