"""How often the recovery claims fire when there is nothing to recover: simulations under the null.

Run: `python benchmarks/null_recovery.py [--draws 2000] [--layers 32]`. Each draw simulates one
sweep's held-out per-image counts ([tp, fp, fn] per class, 75 images, 9 classes) at the adapter
output and at every LLM layer, all from the same distribution (no layer is better than the
adapter's output; layers are correlated along depth, as real residual streams are), and reads it
with the library's own summary code. It prints the rate at which each procedure claims a recovery
above zero (nominal 2.5%, one-sided, of a two-sided 95% interval):
1. the old procedure: the peak layer chosen on the test images, then its interval;
2. the layer fixed before looking (the last, mmlens's default);
3. "some layer is above zero" from the simultaneous (max-statistic) intervals over all layers.
Then recovery heads under the null: top-k heads by mean effect, scored on the images that chose
them versus on other images (mean effect of the chosen heads; the null is zero).
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np

from mmlens.probing.metrics import SegmentationScores
from mmlens.probing.sites import Site
from mmlens.probing.summary import layer_recoveries, summary_samples
from mmlens.resampling import bootstrap_indices

N_IMAGES, N_CLASSES = 75, 9


def simulated_counts(rng: np.random.Generator, n_sites: int) -> np.ndarray:
    """[n_sites, n_images, 3, n_classes] counts; every site draws from one distribution per image."""
    pixels = rng.multinomial(4096, rng.dirichlet(np.full(N_CLASSES, 0.4), size=N_IMAGES))  # [images, classes]
    skill = rng.beta(6, 4, size=N_IMAGES)  # how hard each image is, shared by every site
    jitter = np.zeros((n_sites, N_IMAGES))
    jitter[0] = rng.normal(0, 0.04, N_IMAGES)
    for s in range(1, n_sites):  # neighbouring sites are alike (AR(1) along depth)
        jitter[s] = 0.8 * jitter[s - 1] + 0.6 * rng.normal(0, 0.04, N_IMAGES)
    correct = np.clip(skill[None] + jitter, 0.02, 0.98)  # [sites, images]
    tp = rng.binomial(pixels[None], correct[..., None])  # [sites, images, classes]
    wrong = pixels[None] - tp
    # each wrongly painted pixel goes to another class at random: fp of that class
    fp = np.zeros_like(tp)
    for c in range(N_CLASSES):
        shares = rng.dirichlet(np.ones(N_CLASSES - 1), size=(n_sites, N_IMAGES))
        fp[..., np.arange(N_CLASSES) != c] += rng.multinomial(wrong[..., c], shares)
    return np.stack([tp, fp, wrong], axis=2)


def sweep_of(counts: np.ndarray, n_boot: int, seed: int) -> SimpleNamespace:
    """The parts of a ProbeSweep the summary reads, over simulated counts."""
    n_layers = counts.shape[0] - 2
    sites = [Site("adapter.hook_in", "adapter", -1, "A-in"), Site("adapter.hook_out", "adapter", 1, "A-out")]
    sites += [Site(f"blocks.{l}.hook_resid_post", "llm", l, f"L{l}") for l in range(n_layers)]
    scores = {}
    for site, site_counts in zip(sites, counts):
        scores[("model", site.hook)] = SegmentationScores(N_CLASSES, 255, per_image=list(site_counts))
    table = SimpleNamespace(hook=np.array([s.hook for s in sites]), condition=np.array(["model"] * len(sites)))
    return SimpleNamespace(sites=sites, scores=scores, table=table, test_indices=np.arange(N_IMAGES),
                           bootstrap=bootstrap_indices(N_IMAGES, n_boot, seed),
                           settings=SimpleNamespace(recovery_layer="last"))


def recovery_rates(draws: int, n_layers: int, n_boot: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    fired = {"peak chosen on test images": 0, "last layer, fixed before looking": 0,
             "any layer, simultaneous intervals": 0}
    for draw in range(draws):
        sweep = sweep_of(simulated_counts(rng, n_layers + 2), n_boot, seed + draw)
        layers = layer_recoveries(sweep)
        fixed = summary_samples(sweep)["recovery_in_llm"]
        fired["last layer, fixed before looking"] += np.percentile(fixed[1:], 2.5) > 0
        peak = int(np.argmax(layers.recovery))  # the old default: the best layer on the test images
        fired["peak chosen on test images"] += layers.low.iloc[peak] > 0
        fired["any layer, simultaneous intervals"] += (layers.simultaneous_low > 0).any()
    return {name: count / draws for name, count in fired.items()}


def head_selection(draws: int, seed: int, n_heads: int = 32 * 32, top_k: int = 4, n_images: int = 64) -> dict[str, float]:
    """Mean effect of the top-k heads under the null, scored on the choosing images or on others."""
    rng = np.random.default_rng(seed)
    same, other = [], []
    for _ in range(draws):
        effects = rng.normal(0, 1, size=(n_heads, n_images))  # per head and image; every head's mean is 0
        half = n_images // 2
        chosen = np.argsort(-effects[:, :half].mean(1))[:top_k]
        same.append(effects[chosen, :half].mean())
        other.append(effects[chosen, half:].mean())
    return {"scored on the choosing images": float(np.mean(same)), "scored on other images": float(np.mean(other)),
            "standard error of the latter": float(np.std(other) / np.sqrt(draws))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for n_layers in args.layers:
        start = time.time()
        rates = recovery_rates(args.draws, n_layers, args.n_boot, args.seed)
        print(f"{n_layers}-layer LLM, {args.draws} null draws, {args.n_boot} resamples each "
              f"({time.time() - start:.0f} s): 'recovery above zero' fires in")
        for name, rate in rates.items():
            print(f"  {rate:6.1%}  {name}")
    heads = head_selection(args.draws, args.seed)
    print("top-4 of 1,024 null heads (per-image effects N(0, 1), 32 images choose, 32 others score): mean effect")
    for name, value in heads.items():
        print(f"  {value:+.3f}  {name}")


if __name__ == "__main__":
    main()
