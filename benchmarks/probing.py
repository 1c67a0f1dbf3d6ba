"""Cost and accuracy of the streaming probe sweep, measured in one run.

Run: `python benchmarks/probing.py [--model tiny-shapes-llava] [--images 200]`. Prints:
1. full sweep time / forward-only time on the same images (ridge and logistic);
2. the naive way (run_with_cache of everything, stack, scikit-learn LogisticRegression per
   site) / ours (logistic), on the same images and sites;
3. mIoU of our logistic probes vs scikit-learn's on the same features, for three sites;
4. peak memory (RSS) of a ridge sweep for two dataset sizes, each in a fresh process;
5. the same for the logistic sweep with `logistic_memory_mb=8` (flat: the features are read back
   from the disk store in chunks) and, for contrast, with the whole store in one chunk.
`--memory-only` runs 4 and 5 alone.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import numpy as np
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation, segmentation_info
from mmlens.probing import token_labels
from mmlens.probing import SegmentationScores, probe_sweep
from mmlens.probing.sites import default_sites, gather_image_tokens


def forward_only(model, dataset, indices, batch_size, prompt=""):
    """What any sweep must do anyway: read the images and run the model on them."""
    for start in range(0, len(indices), batch_size):
        batch = dataset[indices[start : start + batch_size].tolist()]
        _ = [np.asarray(mask) for mask in batch["mask"]]
        model(model.prepare(batch["image"], prompt), return_type=None)


def naive_features(model, dataset, indices, sites, batch_size):
    """run_with_cache of every hook, then stack the image tokens of each site."""
    info = segmentation_info(dataset)
    feats = {s.hook: [] for s in sites}
    labels = {"vision": [], "llm": []}
    valid = {"vision": [], "llm": []}
    masks = []
    for start in range(0, len(indices), batch_size):
        batch = dataset[indices[start : start + batch_size].tolist()]
        inputs = model.prepare(batch["image"])
        m = torch.stack([torch.from_numpy(model.transform_mask(np.asarray(mask)).astype(np.int64)) for mask in batch["mask"]])
        masks.append(m)
        _, cache = model.run_with_cache(inputs)
        for s in sites:
            feats[s.hook].append(gather_image_tokens(s, cache[s.hook], inputs.layout).float())
        for grid in ("vision", "llm"):
            lab = token_labels(m, inputs.layout, n_classes=len(info.class_names), stage=grid)
            labels[grid].append(lab.labels)
            valid[grid].append(lab.valid)
        del cache
    cat = lambda d: {k: torch.cat(v) for k, v in d.items()}  # noqa: E731
    return cat(feats), cat(labels), cat(valid), torch.cat(masks), inputs.layout


def _memory_child(model_name, n, queue, probe="ridge", settings=None):
    torch.set_grad_enabled(False)
    model = HookedMLLM.from_pretrained(model_name)
    data = load_segmentation("scenes", split="validation", n=n, seed=0)
    probe_sweep(model, data, probe=probe, progress=False, n_boot=1000, **(settings or {}))
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def peak_memory(model_name, n, probe="ridge", **settings):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_memory_child, args=(model_name, n, queue, probe, settings))
    process.start()
    value = queue.get()
    process.join()
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-shapes-llava")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory sections (4 and 5)")
    parser.add_argument("--random-model", action="store_true",
                        help="a larger random-weight LLaVA (vision 4 x 256, LLM 8 x 512) instead of --model, "
                             "where the forward pass weighs more against the fixed costs")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.random_model:
        import tempfile

        from mmlens.testing import tiny_llava

        hf, processor = tiny_llava(image_size=64, patch_size=8, vision_layers=4, vision_d_model=256, vision_heads=8,
                                   llm_layers=8, llm_d_model=512, llm_heads=8, llm_d_mlp=1376)
        args.model = tempfile.mkdtemp(prefix="mmlens-bench-")
        hf.save_pretrained(args.model)
        processor.save_pretrained(args.model)
    if args.memory_only:
        return memory_sections(args.model, args.images)
    model = HookedMLLM.from_pretrained(args.model)
    data = load_segmentation("scenes", split="validation", n=args.images, seed=0)
    info = segmentation_info(data)
    indices = np.arange(len(data))
    settings = dict(batch_size=args.batch_size, progress=False, n_boot=1000)
    forward_only(model, data, indices[: args.batch_size], args.batch_size)  # warm up

    start = time.perf_counter()
    forward_only(model, data, indices, args.batch_size)
    t_forward = time.perf_counter() - start
    times, sweeps = {}, {}
    for kind in ("ridge", "logistic"):
        start = time.perf_counter()
        sweeps[kind] = probe_sweep(model, data, probe=kind, **settings)
        times[kind] = time.perf_counter() - start
    sites = default_sites(model)
    print(f"model {args.model}, {args.images} scene images, {len(sites)} sites, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"forward only: {t_forward:.2f} s")
    print(f"1. sweep / forward-only: ridge {times['ridge'] / t_forward:.2f} (target <= 1.5), "
          f"logistic {times['logistic'] / t_forward:.2f} (target <= 3)")

    sweep = sweeps["logistic"]
    train, test = sweep.train_indices, sweep.test_indices
    start = time.perf_counter()
    feats, labels, valid, masks, layout = naive_features(model, data, np.concatenate([train, test]), sites, args.batch_size)
    n_train = len(train)
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    naive_miou = {}
    for s in sites:
        grid = layout.patch_grid if s.grid == "vision" else layout.token_grid
        x, y, v = feats[s.hook], labels[s.grid], valid[s.grid]
        x_train, y_train = x[:n_train][v[:n_train]].numpy(), y[:n_train][v[:n_train]].numpy()
        scaler = StandardScaler().fit(x_train)
        clf = LogisticRegression(C=1.0 / (2 * sweep.settings.l2 * len(x_train)), max_iter=2000, tol=1e-6)
        clf.fit(scaler.transform(x_train), y_train)
        x_test = x[n_train:]
        n_img, n_tok = x_test.shape[:2]
        pred = clf.predict(scaler.transform(x_test.reshape(n_img * n_tok, -1).numpy()))
        scores = SegmentationScores(len(info.class_names), info.ignore_index)
        scores.add(torch.from_numpy(pred).view(n_img, n_tok), y[n_train:], v[n_train:], masks[n_train:], grid)
        naive_miou[s.hook] = scores.miou
    t_naive = time.perf_counter() - start
    print(f"2. naive (cache everything + sklearn per site) / ours (logistic): {t_naive / times['logistic']:.1f}x "
          f"({t_naive:.1f} s vs {times['logistic']:.1f} s; target >= 10x)")

    ours = sweep.table[sweep.table.condition == "model"].set_index("hook").miou
    picks = [sites[len(sites) * i // 3 + 1].hook for i in range(3)]
    print("3. mIoU, ours (logistic) vs scikit-learn on the same features (target: within 0.01):")
    for hook in picks:
        print(f"   {hook:<34} ours {ours[hook]:.4f}  sklearn {naive_miou[hook]:.4f}  diff {abs(ours[hook] - naive_miou[hook]):.4f}")
    worst = max(abs(ours[h] - naive_miou[h]) for h in naive_miou)
    print(f"   largest difference over all {len(sites)} sites: {worst:.4f}")

    memory_sections(args.model, args.images)


def memory_sections(model_name, images):
    small, large = images // 2, images * 2
    mem_small, mem_large = peak_memory(model_name, small), peak_memory(model_name, large)
    print(f"4. peak RSS of a ridge sweep: {small} images {mem_small:.0f} MB, {large} images {mem_large:.0f} MB "
          f"(ratio {mem_large / mem_small:.2f}; should stay ~1)")
    bounded = {n: peak_memory(model_name, n, "logistic", logistic_memory_mb=8, max_iter=20) for n in (small, large)}
    whole = peak_memory(model_name, large, "logistic", logistic_memory_mb=1e6, max_iter=20)
    print(f"5. peak RSS of a logistic sweep, logistic_memory_mb=8: {small} images {bounded[small]:.0f} MB, {large} images "
          f"{bounded[large]:.0f} MB (ratio {bounded[large] / bounded[small]:.2f}; should stay ~1); "
          f"{large} images with the store in one chunk: {whole:.0f} MB")


if __name__ == "__main__":
    main()
