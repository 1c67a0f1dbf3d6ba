"""SAE training throughput and splice overhead, measured in one run on the same images.

Run: `python benchmarks/sae_training.py [--model tiny-shapes-llava] [--images 32] [--hook adapter.hook_out]
[--d-sae 128] [--k 4] [--device cpu]`. Prints (1) SAE training steps in image tokens per second
against the forward pass's image tokens per second on the same images (both counted at the
hook's image tokens), and (2) the forward with the SAE spliced with its error term, and with its
reconstruction, against the plain forward: interleaved medians (`benchmarks/common.py`), so drift
hits every variant alike. The tests assert no timings.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import time_interleaved
from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.sae import image_token_activations, train_sae_on_activations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-shapes-llava")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--hook", default="adapter.hook_out")
    parser.add_argument("--d-sae", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=256, help="tokens per training step")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model = HookedMLLM.from_pretrained(args.model, device=args.device)
    scenes = load_segmentation("scenes", split="train", n=args.images, seed=0)
    inputs = model.prepare(scenes["image"], "")
    with torch.no_grad():
        tokens = image_token_activations(model, scenes, args.hook, batch_size=args.images, device=args.device)
    n_tokens = len(tokens.activations)

    def train(steps: int):
        return train_sae_on_activations(tokens, architecture="topk", k=args.k, d_sae=args.d_sae, steps=steps,
                                        batch_size=args.batch_size, lr=2e-3, device=args.device, log_every=steps)

    sae = train(args.steps).sae
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    timed = {"forward": lambda: (model(inputs, return_type=None), sync()),
             "train 10 steps": lambda: (train(10), sync()),
             "spliced, error term": lambda: (model.run_with_saes(inputs, saes=[sae], use_error_term=True), sync()),
             "spliced, reconstruction": lambda: (model.run_with_saes(inputs, saes=[sae]), sync())}
    start = time.perf_counter()
    seconds = time_interleaved(timed, repeats=args.repeats, warmup=2)
    forward_rate = n_tokens / seconds["forward"]
    training_rate = 10 * args.batch_size / seconds["train 10 steps"]
    print(f"{args.model} on {args.device}, {args.images} images, {n_tokens} image tokens at {args.hook}, "
          f"SAE {args.d_sae} features (TopK k={args.k}), {torch.get_num_threads()} threads")
    print(f"forward: {forward_rate:,.0f} image tokens/s; SAE training: {training_rate:,.0f} tokens/s "
          f"({args.batch_size} per step), {training_rate / forward_rate:.2f}x the forward's rate")
    plain = seconds["forward"]
    for name in ("spliced, error term", "spliced, reconstruction"):
        print(f"{name}: {seconds[name] * 1e3:.1f} ms vs plain {plain * 1e3:.1f} ms, {seconds[name] / plain:.3f}x")
    print(f"({args.repeats} interleaved repeats, {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
