"""Coefficients of the scale model in docs/scale.md, measured on this machine.

Run: `python benchmarks/scale.py [--threads N]`. Random-weight LLaVA-style models with the real
hidden sizes of LLaVA-1.5-7B (CLIP-L/336 tower d=1024, Vicuna-7B LLM d=4096, MLP 11008) and of
Qwen2.5-VL-7B (tower d=1280, LLM d=3584, MLP 18944, 4 KV heads) but 2 vision and 2 LLM layers,
float32 on CPU. Printed per model: forward seconds per token per layer (vision tower and LLM
separately), ridge-statistics update seconds per training token per site (float64 d x d), and
logistic L-BFGS seconds per token per evaluation (d x 150 classes). Bytes are exact from shapes.
The load average is printed with them: measured on a busy machine they are upper bounds.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image

from mmlens import HookedMLLM
from mmlens.probing.logistic import TensorFeatures, _fit_one, chunk_rows
from mmlens.probing.ridge import RidgeStatistics
from mmlens.testing import tiny_llava

SHAPES = {
    "llava-1.5-7b": dict(image_size=336, patch_size=14, vision_d_model=1024, vision_heads=16, llm_d_model=4096,
                         llm_heads=32, llm_d_mlp=11008),
    "qwen2.5-vl-7b": dict(image_size=224, patch_size=14, vision_d_model=1280, vision_heads=16, llm_d_model=3584,
                          llm_heads=28, llm_kv_heads=4, llm_d_mlp=18944),
}


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def measure(name: str, shape: dict, n_images: int = 2, classes: int = 150) -> dict[str, float]:
    hf, processor = tiny_llava(vision_layers=2, llm_layers=2, **shape)
    model = HookedMLLM.from_hf(hf, processor, verify=False)
    rng = np.random.default_rng(0)
    size = shape["image_size"]
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n_images)]
    inputs = model.prepare(images, "")
    tokens_vision = model.cfg.vision.n_patches + 1 if hasattr(model.cfg.vision, "n_patches") else None
    seq = inputs.input_ids.shape[1]
    names = [n for n in model.hook_names() if n.endswith("hook_resid_post")]
    keep = lambda x, hook: None  # noqa: E731  (a listener: the hooked path runs, as in a sweep)
    whole = best_of(lambda: model.run_with_hooks(inputs, fwd_hooks=[(n, keep) for n in names], return_type=None))
    vision = best_of(lambda: model.run_vision(inputs.pixel_values))
    d_llm, d_vision = shape["llm_d_model"], shape["vision_d_model"]
    n_vision_tokens = (size // shape["patch_size"]) ** 2 + 1
    x = torch.randn(4096, d_llm)
    y = torch.randint(0, classes, (4096,))
    stats = RidgeStatistics(d_llm, classes)
    ridge = best_of(lambda: stats.update(x, y)) / len(x)
    features = TensorFeatures(x, y)
    start = time.perf_counter()
    _fit_one(features, classes, 1e-3, 5, torch.float32, chunk_rows(d_llm, classes, 1024), None)
    fit = time.perf_counter() - start
    return {
        "vision s/token/layer": vision / (n_images * n_vision_tokens * 2),
        "llm s/token/layer": max(whole - vision, 0) / (n_images * seq * 2),
        "ridge update s/token (LLM site)": ridge,
        "logistic s/token/evaluation (LLM site)": fit / (len(x) * 6),  # 5 iterations: about 6 evaluations
        "seq": seq, "vision tokens": n_vision_tokens, "d_llm": d_llm, "d_vision": d_vision, "tokens_vision": tokens_vision,
    }


# params, vision layers, d_vision, vision tokens, adapter widths, LLM layers, d_llm, LLM image tokens, LLM params
STUDIES = {
    "LLaVA-1.5-7B": (7.06e9, 24, 1024, 576, (1024, 4096, 4096), 32, 4096, 576, 6.74e9),
    "Qwen2.5-VL-7B": (8.29e9, 32, 1280, 1024, (5120, 5120, 3584), 28, 3584, 256, 7.62e9),
    "Qwen2.5-VL-72B": (73.4e9, 32, 1280, 1024, (5120, 5120, 8192), 80, 8192, 256, 72.7e9),
}


def projections(args) -> None:
    """Sizes (exact) and GPU time (from FLOPs at the assumed throughputs) of an ADE20K study."""
    train, test, classes, text = 1500, 500, 150, 40
    print(f"assumed per GPU: {args.gpu_tflops} TFLOP/s bf16 (forward), {args.fp32_tflops} TFLOP/s float32 "
          f"(logistic), {args.fp64_tflops} TFLOP/s float64 (ridge); 120 L-BFGS evaluations per probe, 2 label sets")
    for name, (params, vl, dv, tv, adapter, ll, dl, tl, llm_params) in STUDIES.items():
        sites = ([(dv, tv)] * (vl + 1) + [(adapter[0], tv if name.startswith("LLaVA") else tl), (adapter[1], tl),
                 (adapter[2], tl)] + [(dl, tl)] * (ll + 1))
        forward = 2 * llm_params * (tl + text) + 2 * (params - llm_params) * tv  # FLOPs per image
        sweep_forward = forward * (train + test) / (args.gpu_tflops * 1e12)
        ridge = sum(2 * d * d * train * t for d, t in sites) / (args.fp64_tflops * 1e12)
        logistic = sum(4 * d * classes * train * t for d, t in sites) * 120 * 2 / (args.fp32_tflops * 1e12)
        store = sum(train * t * (2 * d + 8) for d, t in sites)
        # a site held in one chunk is read twice (once per label set); otherwise at every evaluation
        reread, once = store * 2 * 120 / (args.disk_gbps * 1e9), store * 2 / (args.disk_gbps * 1e9)
        one_chunk_gb = train * tl * 4 * (2 * dl + 2 * classes) / 1e9
        print(f"{name}: {len(sites)} sites, forward {forward / 1e12:.1f} TFLOP/image; one GPU: sweep forwards "
              f"{sweep_forward / 60:.1f} min, ridge updates {ridge / 60:.1f} min, logistic fits {logistic / 60:.1f} min "
              f"of compute; logistic store {store / 1e9:.0f} GB, read at {args.disk_gbps} GB/s: {reread / 3600:.1f} h "
              f"when sites are re-read per evaluation, {once / 60:.1f} min when each LLM site fits one chunk "
              f"(logistic_memory_mb >= {one_chunk_gb * 1e3 / 1.048576:.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--project", action="store_true", help="print the projections of docs/scale.md and stop")
    parser.add_argument("--gpu-tflops", type=float, default=300.0)
    parser.add_argument("--fp32-tflops", type=float, default=50.0)
    parser.add_argument("--fp64-tflops", type=float, default=50.0)
    parser.add_argument("--disk-gbps", type=float, default=2.0)
    args = parser.parse_args()
    if args.project:
        return projections(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    for name, shape in SHAPES.items():
        found = measure(name, shape)
        print(name, {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in found.items()})
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
