"""The device check: mmlens on one GPU at LLaVA-1.5-7B shapes, in under 5 minutes, model included.

Run: `python benchmarks/gpu_check.py --out gpu_check.json` on a machine with one GPU (about 40 GB
free: 14 GB of bfloat16 weights, 28 GB when they are cast to float32 for the last step), or
`--tiny` for the same code paths on a tiny config on the CPU (what the test suite runs). The
model is a random-weight LLaVA built from a `LlavaConfig` on the meta device and materialised on
the device (no download); random weights give the timings, memory and precision of the real shapes,
not meaningful probe scores. Each step writes its entry to the JSON file as soon as it finishes,
so a run stopped at its time limit keeps what was done; a step that fails records its error and
the next one runs.

Steps: build (seconds, parameters), hf_forward (TFLOP/s of Hugging Face's forward, FLOPs counted
as 2 x parameters x tokens per matmul weight plus attention's 4 x layers x tokens^2 x width),
overhead (HookedMLLM with no hook, a hook on every layer, run_with_cache, against HF), ridge_sweep
and logistic_sweep (50 synthetic scenes), head_sweep (every head of a few layers patched, its time
extrapolated to every layer), precision (the bfloat16 model against the same weights in float32)
and, in every entry, peak device memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from mmlens import HookedMLLM
from mmlens.testing import tiny_llava

# LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (24 layers, 1024 wide), a 2-layer MLP projector, Vicuna-7B
FULL = dict(image_size=336, patch_size=14, vision_layers=24, vision_d_model=1024, vision_heads=16, vision_d_mlp=4096,
            llm_layers=32, llm_d_model=4096, llm_heads=32, llm_d_mlp=11008, vocab=32064, batch=8, images=50,
            head_layers=(15, 31), repeats=5)
TINY = dict(image_size=32, patch_size=8, vision_layers=2, vision_d_model=32, vision_heads=4, vision_d_mlp=128,
            llm_layers=2, llm_d_model=64, llm_heads=4, llm_d_mlp=256, vocab=None, batch=4, images=24,
            head_layers=(1,), repeats=2)
PROMPT = "what is in the image ?"


class Report:
    """The JSON file, rewritten whole (atomically) after every step."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path, self.data = path, {**header, "steps": {}}
        self._write()

    def step(self, name: str, fn: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any] | None:
        _reset_peak(device)
        started = time.perf_counter()
        try:
            entry, failed = fn(), None
        except Exception as error:  # a device check reports what broke and goes on
            entry, failed = {}, f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=6)}"
        entry = {**entry, "seconds": round(time.perf_counter() - started, 3), "peak_memory_gb": _peak_gb(device)}
        if failed:
            entry["error"] = failed
        self.data["steps"][name] = entry
        self._write()
        print(f"{name}: {json.dumps({k: v for k, v in entry.items() if k != 'error'})}" + (f"\n{failed}" if failed else ""),
              flush=True)
        return None if failed else entry

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".partial")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    """A random-weight LLaVA at `shape`, parameters created on the meta device and materialised
    on `device` (weights and buffers, such as rotary frequencies, initialised by Hugging Face's
    own init there): no CPU copy of the full model is ever made."""
    from transformers import LlavaForConditionalGeneration

    # the processor (and a config with its token ids) from the tiny builder at the same image geometry
    small, processor = tiny_llava(image_size=shape["image_size"], patch_size=shape["patch_size"], vision_layers=1,
                                  vision_d_model=32, vision_heads=4, llm_layers=1, llm_d_model=64, llm_heads=4)
    config = copy.deepcopy(small.config)
    config.vision_config.update(dict(hidden_size=shape["vision_d_model"], intermediate_size=shape["vision_d_mlp"],
                                     num_hidden_layers=shape["vision_layers"], num_attention_heads=shape["vision_heads"],
                                     projection_dim=shape["vision_d_model"]))
    config.text_config.update(dict(hidden_size=shape["llm_d_model"], intermediate_size=shape["llm_d_mlp"],
                                   num_hidden_layers=shape["llm_layers"], num_attention_heads=shape["llm_heads"],
                                   num_key_value_heads=shape["llm_heads"],
                                   vocab_size=shape["vocab"] or config.text_config.vocab_size))
    config._attn_implementation = "sdpa" if device.type == "cuda" else "eager"
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model = model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    return model.to(dtype).eval(), processor


def forward_flops(shape: dict, n_images: int, text_tokens: int) -> float:
    """Matmul FLOPs of one forward: 2 x weight parameters x tokens, plus attention's scores and
    mixing (4 x tokens^2 x width per layer), for the vision tower and the LLM."""
    patches = (shape["image_size"] // shape["patch_size"]) ** 2
    v, l = shape["vision_d_model"], shape["llm_d_model"]
    vision_weights = shape["vision_layers"] * (4 * v * v + 2 * v * shape["vision_d_mlp"])
    llm_weights = shape["llm_layers"] * (4 * l * l + 3 * l * shape["llm_d_mlp"])
    tokens = patches + text_tokens
    vision = n_images * (2 * vision_weights * (patches + 1) + shape["vision_layers"] * 4 * (patches + 1) ** 2 * v)
    projector = n_images * 2 * patches * (v * l + l * l)
    llm = n_images * (2 * llm_weights * tokens + shape["llm_layers"] * 4 * tokens**2 * l
                      + 2 * tokens * l * (shape["vocab"] or 0))
    return float(vision + projector + llm)


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    with torch.no_grad():
        fn()  # warm-up: kernels chosen, caches filled
        times = []
        for _ in range(repeats):
            _sync(device)
            started = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(tiny: bool, out: Path, device_name: str | None) -> dict:
    shape = TINY if tiny else FULL
    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() and not tiny else "cpu"))
    header = {"mode": "tiny" if tiny else "full", "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "python": platform.python_version(), "shape": shape}
    report = Report(out, header)
    state: dict[str, Any] = {}

    def build():
        started = time.perf_counter()
        hf, processor = build_model(shape, device, torch.bfloat16)
        _sync(device)
        state["model"] = HookedMLLM.from_hf(hf, processor, verify=tiny)  # verification at 7B would cost a minute
        return {"build_seconds": round(time.perf_counter() - started, 3),
                "parameters": sum(p.numel() for p in hf.parameters()),
                "weights_gb": sum(p.numel() * p.element_size() for p in hf.parameters()) / 2**30}

    if report.step("build", build, device) is None:
        return report.data
    model = state["model"]
    from mmlens.data import load_segmentation

    scenes = load_segmentation("scenes", split="validation", n=shape["images"], seed=0, image_size=shape["image_size"])
    inputs = model.prepare(scenes[list(range(shape["batch"]))]["image"], PROMPT)
    hf_inputs = dict(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values)

    def hf_forward():
        seconds = median_seconds(lambda: model.hf_model(**hf_inputs), device, shape["repeats"])
        text = inputs.input_ids.shape[1] - (shape["image_size"] // shape["patch_size"]) ** 2
        flops = forward_flops(shape, shape["batch"], text)
        state["hf_seconds"] = seconds
        return {"images": shape["batch"], "sequence": inputs.input_ids.shape[1], "forward_seconds": seconds,
                "tflop": flops / 1e12, "tflops_per_second": flops / seconds / 1e12}

    def overhead():
        layers = [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]
        listened = [(name, lambda activation, hook: None) for name in layers]
        timed = {
            "no_hooks": lambda: model(inputs, return_type="logits"),
            "every_layer_listened": lambda: model.run_with_hooks(inputs, fwd_hooks=listened, return_type="logits"),
            "cache_every_layer": lambda: model.run_with_cache(inputs, names_filter=lambda n: n in layers)[1],
        }
        seconds = {name: median_seconds(fn, device, shape["repeats"]) for name, fn in timed.items()}
        base = state.get("hf_seconds") or median_seconds(lambda: model.hf_model(**hf_inputs), device, shape["repeats"])
        return {"hf_seconds": base, **{f"{name}_seconds": s for name, s in seconds.items()},
                **{f"{name}_over_hf": s / base for name, s in seconds.items()}}

    sites = ["adapter.hook_in", "adapter.hook_out",
             *[f"blocks.{l}.hook_resid_post" for l in sorted({model.cfg.n_layers // 2, model.cfg.n_layers - 1})]]

    def sweep(kind: str):
        from mmlens.probing import probe_sweep

        def go():
            found = probe_sweep(model, scenes, sites=sites, probe=kind, batch_size=shape["batch"], progress=False,
                                n_boot=1000, max_train_tokens_per_image=64 if kind == "logistic" else None,
                                max_iter=30)
            return {"images": len(scenes), "sites": sites, "miou": dict(zip(found.table.hook, found.table.miou))}
        return go

    def heads():
        from mmlens.interventions import Run, head_sweep
        from mmlens.interventions.corruptions import recovery_blocked
        from mmlens.interventions.patching_metrics import logit_difference

        layers = list(shape["head_layers"])
        small = model.prepare(scenes[[0, 1]]["image"], PROMPT)
        with torch.no_grad():
            _sync(device)
            started = time.perf_counter()
            values = head_sweep(model, Run(small), recovery_blocked(model, small), logit_difference(5, 7), layers=layers)
            _sync(device)
        seconds = time.perf_counter() - started
        per_layer = seconds / len(layers)
        return {"layers": layers, "heads_per_layer": model.cfg.llm.n_heads, "images": 2, "seconds_measured": seconds,
                "seconds_per_layer": per_layer, "all_heads_seconds_estimate": per_layer * model.cfg.n_layers,
                "finite": bool(torch.isfinite(values).all())}

    def precision():
        names = ["adapter.hook_out", f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
        with torch.no_grad():
            half_logits, half_cache = model.run_with_cache(inputs, names_filter=lambda n: n in names)
            half = {"logits": half_logits.float().cpu(), **{n: half_cache[n].float().cpu() for n in names}}
            del half_cache
            model.to(torch.float32)  # the same weights, widened in place (28 GB at 7B)
            full_logits, full_cache = model.run_with_cache(inputs, names_filter=lambda n: n in names)
            full = {"logits": full_logits.cpu(), **{n: full_cache[n].float().cpu() for n in names}}
        out = {}
        for name in full:
            gap = (half[name] - full[name]).abs()
            out[name] = {"max_abs": float(gap.max()), "relative_rms": float(gap.pow(2).mean().sqrt()
                                                                             / full[name].pow(2).mean().sqrt())}
        out["next_token_agreement"] = float((half["logits"][:, -1].argmax(-1) == full["logits"][:, -1].argmax(-1))
                                            .float().mean())
        return out

    for name, fn in (("hf_forward", hf_forward), ("overhead", overhead), ("ridge_sweep", sweep("ridge")),
                     ("logistic_sweep", sweep("logistic")), ("head_sweep", heads), ("precision", precision)):
        report.step(name, fn, device)
    return report.data


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float:
    """Peak device memory of the step (CUDA); on the CPU, the process's peak resident memory so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny config on the CPU: the same code paths, in seconds")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    args = parser.parse_args(argv)
    data = run(args.tiny, args.out, args.device)
    failed = [name for name, entry in data["steps"].items() if "error" in entry]
    print(f"wrote {args.out}" + (f"; failed steps: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
