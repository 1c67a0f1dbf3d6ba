"""Which embedded model and dataset size the demo runs, measured on scenes the demo never scores.

Run: `python benchmarks/demo_choice.py [--sizes 300 1200] [--data-seed 1]`. For each shipped model
and size, the probe sweep of the demo (ridge, penalties cross-validated on the training images,
the re-drawn-LLM control) on a fresh draw of scenes (`dataset.seed` 1; the demo draws seed 0),
printing the drop at the adapter, the recovery at the last LLM layer, the recovery over the
re-drawn LLM's, each with its 95% interval, and the sweep's time. The demo's choice is made
from this table, so the images the demo reports on chose nothing.
"""

from __future__ import annotations

import argparse
import time

import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.findings import with_interval
from mmlens.probing import probe_sweep

MODELS = ("tiny-shapes-llava", "tiny-shapes-llava-bidir", "tiny-shapes-llava-v2", "tiny-shapes-llava-v2-bidir")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1200])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--data-seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print("| model | scenes | drop at the adapter | recovery at the last LLM layer | recovery over a re-drawn LLM's | sweep s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        scenes = load_segmentation("scenes", split="validation", n=size, image_size=64, seed=args.data_seed)
        for name in args.models:
            model = HookedMLLM.from_pretrained(name)
            start = time.perf_counter()
            sweep = probe_sweep(model, scenes, probe="ridge", control="random_llm", batch_size=32, progress=False)
            seconds = time.perf_counter() - start
            s = sweep.summary()
            cells = [with_interval(s.loc[k, "value"], s.loc[k, "low"], s.loc[k, "high"], signed=True)
                     for k in ("drop_at_adapter", "recovery_in_llm", "recovery_over_random_llm")]
            print(f"| {name} | {size} | " + " | ".join(cells) + f" | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
