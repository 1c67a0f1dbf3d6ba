"""Cost and faithfulness of activation and attribution patching, measured in one run.

Run: `python benchmarks/patching.py [--model tiny-shapes-llava] [--images 64] [--sections 1 2 3]`. Prints:
1. the head sweep (every LLM layer x head, clean -> recovery-blocked, probe margin) with the
   conditions batched (default chunks: 32 rows per forward) and with 16 replicas per forward,
   against one forward per head, for targets of 1 and of 8 images, and the largest difference
   between batched and one at a time (must be 0 or float rounding); the knockout is unverified
   here so that both ways do the same work per row; and the work ratio an exact sweep of
   full-width copies that skip the attention of the layer they patch reaches at the target
   forward's cost per row (`exact_sweep_work`);
2. attribution patching's cost in forward-pass equivalents (its time / one forward of the
   corrupted run with its edit and the metric);
3. the recovery-heads study per corruption: wall time, and the Spearman correlation of
   attribution with exact head patching over its images.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import time_interleaved  # noqa: E402

from mmlens import HookedMLLM  # noqa: E402
from mmlens.data import load_segmentation  # noqa: E402
from mmlens.experiments import find_recovery_heads  # noqa: E402
from mmlens.interventions import Run, attribution_patching, baseline, head_sweep, probe_metric, recovery_blocked  # noqa: E402
from mmlens.interventions.patching import run_and_collect  # noqa: E402
from mmlens.interventions.shared_forward import rows_joining  # noqa: E402
from mmlens.probing import probe_sweep  # noqa: E402
from mmlens.probing.batches import labelled_batches  # noqa: E402

READOUT = "blocks.3.hook_resid_post"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-shapes-llava")
    parser.add_argument("--images", type=int, default=64, help="images in the recovery-heads study")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = HookedMLLM.from_pretrained(args.model)
    scenes = load_segmentation("scenes", split="validation", n=4 * args.images, seed=0)
    sweep = probe_sweep(model, scenes, sites=["adapter.hook_out", READOUT], probe="ridge", progress=False, n_boot=1000)
    print(f"model {args.model}: {model.cfg.n_layers} layers x {model.cfg.llm.n_heads} heads, torch threads "
          f"{torch.get_num_threads()}")

    print("\n1. head sweep, batched vs one forward per head")
    for n in (1, 8) if 1 in args.sections else (8,):
        batch = next(labelled_batches(model, scenes, sweep.test_indices[:n], batch_size=n))
        metric = probe_metric(model, sweep.probes[("model", READOUT)], READOUT, batch.inputs, batch.labels["llm"])
        # unverified for the timing, so both ways do the same work per row (verification of the
        # unrepeated batch is what recovery_blocked does by default)
        clean, corrupted = Run(batch.inputs), recovery_blocked(model, batch.inputs, verify=False)
        batched = head_sweep(model, clean, corrupted, metric, chunk_size=None)
        if 1 not in args.sections:
            continue
        sequential = head_sweep(model, clean, corrupted, metric, chunk_size=1)
        by_hand = full_forward_per_head(model, clean, corrupted, metric)
        times = time_interleaved({
            "batched": lambda: head_sweep(model, clean, corrupted, metric, chunk_size=None),
            "all16": lambda: head_sweep(model, clean, corrupted, metric, chunk_size=16),
            "sequential": lambda: head_sweep(model, clean, corrupted, metric, chunk_size=1),
            "by_hand": lambda: full_forward_per_head(model, clean, corrupted, metric),
        }, repeats=args.repeats, warmup=1)
        print(f"   target of {n} image(s): batched {times['batched']:.3f} s (16 per forward {times['all16']:.3f} s); "
              f"one full forward per head by hand {times['by_hand']:.3f} s -> {times['by_hand'] / times['batched']:.1f}x "
              f"faster; mmlens one condition per forward {times['sequential']:.3f} s -> "
              f"{times['sequential'] / times['batched']:.1f}x; max |difference| batched vs one at a time "
              f"{float((batched - sequential).abs().max()):.2e}, vs by hand {float((batched - by_hand).abs().max()):.2e}")
        exact_sweep_work(model, corrupted, args.repeats)

    if 2 in args.sections:
        attribution_cost(model, clean, corrupted, metric, args.repeats)
    if 3 in args.sections:
        recovery_heads_studies(model, sweep, args.images)


def exact_sweep_work(model, corrupted, repeats: int) -> None:
    """The ratio to the hand-written loop that an exact sweep of full-width copies reaches if a row
    costs in a batched copy what it costs in the target's own forward F: the loop runs 17 forwards
    (16 heads and the clean run); such a sweep runs one (the clean run), the target's LLM, and
    each copy's LLM layers from its own up, less the attention of its own layer (a copy joins
    after it, at hook_z). The LLM's share is F minus the vision tower and adapter
    (`stop_at_layer=0`); a layer's attention share is the difference between running that one
    block and running it with the rows joining at its hook_z. Batching can lower the cost per row
    below F's (much so for one image, whose forwards are mostly fixed cost), so this is a work
    ratio, not a bound on every machine."""
    cfg, inputs = model.cfg, corrupted.inputs
    hooks = corrupted.edit(inputs).hooks if corrupted.edit else []
    names = [f"blocks.{l}.{n}" for l in range(cfg.n_layers) for n in ("hook_resid_pre", "attn.hook_z")]
    target = run_and_collect(model, corrupted, names)
    rows = len(inputs)

    def block(layer: int, skip_attention: bool):
        joining = {"attending": {layer: 0}, "joining_z": {layer: target[f"blocks.{layer}.attn.hook_z"]}} if skip_attention else {}
        with rows_joining(model, {layer: rows}, rows, **joining):
            model.run_with_hooks(inputs, fwd_hooks=hooks, llm_inputs_embeds=target[f"blocks.{layer}.hook_resid_pre"],
                                 start_at_layer=layer, stop_at_layer=layer + 1)

    times = time_interleaved({
        "forward": lambda: model.run_with_hooks(inputs, fwd_hooks=hooks),
        "vision": lambda: model(inputs, stop_at_layer=0),
        **{f"block {l}": partial(block, l, False) for l in range(cfg.n_layers)},
        **{f"block {l} from z": partial(block, l, True) for l in range(cfg.n_layers)},
    }, repeats=max(10, 5 * repeats), warmup=2)
    layers, heads = cfg.n_layers, cfg.llm.n_heads
    llm = max(times["forward"] - times["vision"], 0.0)
    attention = [max(times[f"block {l}"] - times[f"block {l} from z"], 0.0) for l in range(layers)]
    copies = heads * sum((layers - l) / layers * llm - attention[l] for l in range(layers))
    floor = times["forward"] + llm + copies
    hand = (layers * heads + 1) * times["forward"]
    print(f"   work of an exact sweep of full-width copies ({len(inputs)} image(s)), at the target forward's cost per row: "
          f"forward {times['forward']:.3f} s, of which vision tower + adapter {times['vision']:.3f} s "
          f"({times['vision'] / times['forward']:.0%}) and attention {sum(attention):.3f} s "
          f"({sum(attention) / times['forward']:.0%}); sweep {floor:.3f} s against the loop's {hand:.3f} s -> "
          f"{hand / floor:.1f}x")


def attribution_cost(model, clean, corrupted, metric, repeats: int) -> None:
    print("\n2. attribution patching cost (target of 8 images)")
    times = time_interleaved({
        "forward": lambda: baseline(model, corrupted, metric),
        "attribution": lambda: attribution_patching(model, clean, corrupted, metric),
    }, repeats=repeats, warmup=1)
    print(f"   one forward {times['forward']:.3f} s, attribution {times['attribution']:.3f} s -> "
          f"{times['attribution'] / times['forward']:.2f} forward-pass equivalents "
          f"(exact head sweep: {model.cfg.n_layers * model.cfg.llm.n_heads} patched forwards)")



def recovery_heads_studies(model, sweep, n_images: int) -> None:
    print(f"\n3. recovery-heads study on {n_images} held-out images (attribution vs exact)")
    for corruption in ("recovery_blocked", "anchors_removed", "counterfactual"):
        start = time.perf_counter()
        result = find_recovery_heads(model, sweep, corruption=corruption, n_images=n_images)
        elapsed = time.perf_counter() - start
        s = result.summary
        best = result.table.iloc[0]
        print(f"   {corruption:17s} {elapsed:5.1f} s  Spearman {s['rank_correlation']:.3f}  gap {s['gap']:.3f} "
              f"[{s['gap_low']:.3f}, {s['gap_high']:.3f}]  best L{int(best.layer)}H{int(best['head'])} "
              f"{best.effect:.3f} [{best.effect_low:.3f}, {best.effect_high:.3f}]  top-{result.settings['top_k']} "
              f"restore {s['top_k_fraction_restored']:.3f}")


def full_forward_per_head(model, clean, corrupted, metric) -> torch.Tensor:
    """The loop a TransformerLens user writes: per head, one full forward of the corrupted run
    (vision tower included) with a hook that puts the clean head output back."""
    cfg = model.cfg
    names = [f"blocks.{l}.attn.hook_z" for l in range(cfg.n_layers)]
    _, cache = model.run_with_cache(clean.inputs, names_filter=names)
    edit = corrupted.edit(corrupted.inputs).hooks if corrupted.edit else []
    store: dict[str, torch.Tensor] = {}

    def keep(x, hook):
        store[hook.name] = x

    read = [(model.resolve_hook_name(n), keep) for n in getattr(metric, "hooks", ())]
    out = torch.empty(cfg.n_layers, cfg.llm.n_heads, len(corrupted.inputs))
    for layer in range(cfg.n_layers):
        for head in range(cfg.llm.n_heads):
            def put_back(z, hook, layer=layer, head=head):
                z = z.clone()
                z[:, :, head] = cache[names[layer]][:, :, head]
                return z

            logits = model.run_with_hooks(corrupted.inputs, fwd_hooks=[*edit, (names[layer], put_back), *read])
            out[layer, head] = metric({**store, "logits": logits}, corrupted.inputs)
    return out


if __name__ == "__main__":
    main()
