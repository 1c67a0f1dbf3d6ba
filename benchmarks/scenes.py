"""Synthetic scene rendering speed (the test suite asserts no timings; this prints them).

Run: `python benchmarks/scenes.py [--n 500] [--size 64]`. Prints scenes rendered per second,
CPU seconds too (they do not stretch when other work shares the machine).
"""

from __future__ import annotations

import argparse
import time

from mmlens.data.scenes import render_scene, scene_rng


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    rngs = [scene_rng(0, "train", i) for i in range(args.n)]
    wall, cpu = time.perf_counter(), time.process_time()
    for rng in rngs:
        render_scene(rng, args.size)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{args.n} scenes of {args.size} px: {args.n / wall:.0f} scenes/s wall, {args.n / cpu:.0f} per CPU second")


if __name__ == "__main__":
    main()
