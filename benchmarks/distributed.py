"""Speedup of 2 processes over 1 on this machine (torch.distributed, gloo, CPU), and equality.

Run: `python benchmarks/distributed.py [--images 64]`. It starts itself under torchrun with 1 and
with 2 processes (`python -m torch.distributed.run --standalone --nproc-per-node N`), each rank on
one thread, and times on rank 0:
1. a ridge and a logistic probe sweep over every site of tiny-shapes-llava;
2. a head sweep (every LLM head, recovery-blocked corruption, logit difference) over the images
   in batches of 4, the batches shared over ranks (`mmlens.distributed.map_batches`);
3. the three experiment stages as a study runs them, each sharing its image batches over the
   ranks: the anchor knockout and the recovery heads (recovery-blocked, attribution on) on the
   held-out images of one ridge sweep, and the position study (two ridge sweeps of its own and
   the cross reading). The sweep they start from is fitted by each rank alone, so it is the same
   in both runs and their per-image results can be compared exactly.
Then it prints the speedups and whether the 2-process results equal the 1-process ones (tables
within 1e-6, held-out predictions, head-sweep values and the experiments' per-image values
exactly). On a machine whose cores are busy with other work the speedup is bounded by the free
cores: say the load with the figure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def worker(images: int, out: Path) -> None:
    from mmlens import HookedMLLM, distributed
    from mmlens.data import load_segmentation
    from mmlens.experiments import anchor_knockout, find_recovery_heads, position_study
    from mmlens.interventions.corruptions import recovery_blocked
    from mmlens.interventions.patching import Run, head_sweep
    from mmlens.interventions.patching_metrics import logit_difference
    from mmlens.probing import probe_sweep

    distributed.init_from_environment()
    torch.set_grad_enabled(False)
    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    scenes = load_segmentation("scenes", split="validation", n=images, seed=0)
    results, seconds = {}, {}
    for kind in ("ridge", "logistic"):
        distributed.barrier()
        start = time.perf_counter()
        sweep = probe_sweep(model, scenes, probe=kind, progress=False, n_boot=1000, batch_size=8, max_iter=50)
        seconds[kind] = time.perf_counter() - start
        results[kind] = (sweep.table, sweep.predictions)

    def heads(start: int, stop: int) -> torch.Tensor:
        inputs = model.prepare(scenes[list(range(start, stop))]["image"], "what is in the image ?")
        return head_sweep(model, Run(inputs), recovery_blocked(model, inputs), logit_difference(5, 7))

    distributed.barrier()
    start = time.perf_counter()
    results["heads"] = torch.cat(distributed.map_batches(min(images, 32), 4, heads), dim=-1)
    seconds["heads"] = time.perf_counter() - start

    with distributed.alone():  # the experiments' starting point, the same in every run (not timed)
        sweep = probe_sweep(model, scenes, sites=["adapter.hook_out", "blocks.1.hook_resid_post",
                                                  "blocks.3.hook_resid_post"], probe="ridge", progress=False, n_boot=1000)
    studies = {
        "knockout": lambda: anchor_knockout(model, sweep, n_pairs=2, n_control=2, batch_size=4, n_boot=1000),
        "position": lambda: position_study(model, scenes, probe="ridge", n_boot=1000, batch_size=4, progress=False),
        "recovery": lambda: find_recovery_heads(model, sweep, n_images=None, n_maps=2, batch_size=4, n_boot=1000),
    }
    for name, study in studies.items():
        distributed.barrier()
        start = time.perf_counter()
        found = study()
        seconds[name] = time.perf_counter() - start
        results[name] = _per_image(name, found)
    if distributed.is_main():
        torch.save({"results": results, "seconds": seconds, "world": distributed.world_size()}, out)
    distributed.shutdown()


def _per_image(name: str, found) -> dict:
    """What an experiment keeps per image (compared exactly) and its tables (within 1e-6)."""
    if name == "knockout":
        return {"tables": [found.table, found.effects], "per_image": []}
    if name == "position":
        return {"tables": [found.summary, found.gains, found.per_position], "per_image": list(found._hits.values())}
    return {"tables": [found.table, found.top_k], "per_image": [found.exact, found.attribution]}


def launch(n: int, images: int, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               __file__, "--worker", "--images", str(images), "--out", str(out)]
    subprocess.run(command, check=True, env=env, capture_output=True)
    return torch.load(out, weights_only=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.images, args.out)
    folder = Path(tempfile.mkdtemp(prefix="mmlens-bench-dist-"))
    one, two = launch(1, args.images, folder / "one.pt"), launch(2, args.images, folder / "two.pt")
    print(f"tiny-shapes-llava, {args.images} scene images, one thread per rank, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores at the end")
    for name in ("ridge", "logistic", "heads", "knockout", "position", "recovery"):
        a, b = one["seconds"][name], two["seconds"][name]
        print(f"{name:>9}: 1 process {a:6.1f} s, 2 processes {b:6.1f} s, speedup {a / b:.2f}x")
    for kind in ("ridge", "logistic"):
        (t1, p1), (t2, p2) = one["results"][kind], two["results"][kind]
        gap = (t1.select_dtypes("number") - t2.select_dtypes("number")).abs().max().max()
        same = all(torch.equal(p1[k], p2[k]) for k in p1)
        print(f"{kind} sweep: largest table difference {gap:.2e}; held-out predictions identical: {same}")
    print(f"head sweep values identical: {torch.equal(one['results']['heads'], two['results']['heads'])}")
    for name in ("knockout", "position", "recovery"):
        a, b = one["results"][name], two["results"][name]
        gap = max((x.select_dtypes("number") - y.select_dtypes("number")).abs().max().max()
                  for x, y in zip(a["tables"], b["tables"]))
        same = all(np.array_equal(x, y) for x, y in zip(a["per_image"], b["per_image"]))
        print(f"{name}: largest table difference {gap:.2e}; per-image values identical: {same}")


if __name__ == "__main__":
    main()
