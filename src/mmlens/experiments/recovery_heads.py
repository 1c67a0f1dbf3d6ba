"""Recovery heads: which LLM attention heads bring segmentation information back?

Corrupt the run so recovery cannot happen (image -> image attention blocked in the LLM, anchors
removed at the adapter, or another scene), then patch each head's clean output (`hook_z`) into
the corrupted run, one head at a time, and score the image tokens with the sweep's probe at a
readout layer (true-class logit margin). A head's effect is the metric it restores, per image;
intervals are bootstrap resamples of the images. Attribution patching estimates the same effects
in one backward pass, and the top-k heads are patched together to check they restore most of it.
Attention recovery maps show where those heads look, from tokens the adapter gets wrong and the
readout gets right, over the image grid, with the anchors marked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import distributed
from ..interventions import GroupContext, TokenGroup
from ..interventions.attribution import attribution_patching, rank_correlation
from ..interventions.corruptions import anchors_removed, counterfactual_images, derangement, mean_adapter_output, recovery_blocked
from ..interventions.patching import Patch, Run, baseline, evaluate, head_conditions, patch_conditions, run_and_collect
from ..interventions.patching_metrics import probe_metric
from ..model import HookedMLLM
from ..probing.batches import labelled_batches, rank_batches
from ..probing.metrics import bootstrap_indices
from ..probing.sites import site_for
from .anchors import anchor_groups, conflicting_pairs, excluded_classes, pair_classes
from ..display import result_html
from ..findings import effect_phrase, excludes_zero
from .intervals import percentile_interval

Corruption = Literal["recovery_blocked", "anchors_removed", "counterfactual"]
CORRUPTIONS = ("recovery_blocked", "anchors_removed", "counterfactual")


@dataclass
class RecoveryMap:
    """Where the recovery heads of each layer attend, from chosen query tokens of one image."""

    dataset_index: int
    image: np.ndarray  # [height, width, 3] uint8 at the model's input size
    grid: tuple[int, int]
    queries: list[int]  # grid tokens (raster index) the attention is read from
    anchors: list[int]  # grid tokens that are anchors
    attention: dict[int, np.ndarray]  # layer -> [rows, cols], mean over the layer's heads and the queries
    heads: dict[int, list[int]]
    query_kind: str = "recovered"  # or "objects": the image has no recovered token, so all its object tokens


@dataclass
class RecoveryHeadsResult:
    """`table`: one row per LLM head, best first (effect = change of the metric when that head's
    clean output is patched into the corrupted run, mean over images, with a 95% bootstrap
    interval; best = moving it furthest towards the clean value, so a negative gap ranks the most
    negative effects first; `fraction_restored` = effect / gap, withheld (NaN) when the gap's interval
    includes zero). `top_k`: the best k heads patched
    together, k = 1..top_k."""

    table: pd.DataFrame
    top_k: pd.DataFrame
    layers: list[int]  # layers holding the top-k heads
    summary: dict[str, float]
    exact: np.ndarray = field(repr=False)  # [layer, head, image] effect per image
    attribution: np.ndarray | None = field(repr=False)  # [layer, head, image] estimated effect
    maps: list[RecoveryMap] = field(repr=False, default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def top_heads(self) -> list[tuple[int, int]]:
        k = self.settings["top_k"]
        return list(zip(self.table.layer[:k].astype(int), self.table["head"][:k].astype(int)))

    def findings(self) -> list[str]:
        """The gap the corruption opens and what the top heads restore, worded from the intervals
        (fractions are withheld when the gap is not distinguishable from zero)."""
        s, corruption = self.summary, self.settings.get("corruption", "corruption")
        lines = [f"{corruption}: probe margin {s['clean_metric']:.3f} clean, {s['corrupted_metric']:.3f} corrupted "
                 f"(gap {effect_phrase(s['gap'], s['gap_low'], s['gap_high'])}, {s['n_images']} images)"]
        if excludes_zero(s["gap_low"], s["gap_high"]):
            best = self.top_k.iloc[-1]
            lines.append(f"top heads {best.heads} restore {best.fraction_restored:.2f} of the gap "
                         f"[{best.fraction_low:.2f}, {best.fraction_high:.2f}]; exact vs attribution Spearman "
                         f"{s['rank_correlation']:.2f}")
        else:
            lines.append("fractions of the gap restored are withheld: the gap is not distinguishable from zero, so "
                         "the corruption barely changes the readout here")
        return lines

    def _repr_html_(self) -> str:
        return result_html("RecoveryHeadsResult", self.findings(), {"top heads together": self.top_k, "heads": self.table},
                           hint="result.figures() draws the layer x head heatmaps and the recovery maps.")

    def figures(self) -> dict[str, Any]:
        """"head_heatmap" (exact and attribution side by side) and "recovery_map_{i}" per example image."""
        from ..viz.patching_plots import plot_head_heatmaps, plot_recovery_map

        n_layers, n_heads = self.exact.shape[:2]
        exact = self.table.pivot(index="layer", columns="head", values="effect").to_numpy()
        attribution = None
        if self.attribution is not None:
            attribution = self.table.pivot(index="layer", columns="head", values="attribution").to_numpy()
        title = (f"Recovery heads ({self.settings['corruption']}; metric: {self.settings['metric']}). "
                 f"Spearman exact vs attribution: {self.summary.get('rank_correlation', float('nan')):.2f}")
        out = {"head_heatmap": plot_head_heatmaps(exact, attribution, title=title)}
        for i, example in enumerate(self.maps):
            out[f"recovery_map_{i}"] = plot_recovery_map(example)
        return out


def find_recovery_heads(
    model: HookedMLLM,
    sweep,
    *,
    corruption: Corruption = "recovery_blocked",
    readout: str | None = None,
    reference: str = "adapter.hook_out",
    window: Iterable[int] | None = None,
    tokens: Literal["objects", "all", "recovered"] | TokenGroup = "objects",
    anchors: TokenGroup | None = None,
    hook: Literal["z", "result"] = "z",
    images: Sequence[int] | None = None,
    n_images: int | None = 64,
    top_k: int = 4,
    attribution: bool = True,
    n_maps: int = 2,
    n_boot: int = 200,
    batch_size: int = 16,
    chunk_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
    group: Any = None,
) -> RecoveryHeadsResult:
    """Rank the LLM's heads by how much of the probe margin at `readout` they restore.

    `sweep`: a `probe_sweep` with probes at `reference` and `readout` (default: its last LLM
    site). `corruption`: "recovery_blocked" (image -> image attention knocked out in `window`,
    default every LLM layer), "anchors_removed" (anchor tokens' adapter output replaced by the
    mean adapter output of training images) or "counterfactual" (each image swapped for another
    of the study, same prompt). `tokens` scored by the metric: "objects" (labelled tokens not of
    a background class; minus the anchors under "anchors_removed"), "all" labelled tokens, "recovered" (wrong at `reference`, right at
    `readout`) or a TokenGroup. `anchors` (default: tokens the reference probe gets right in
    the 4 most confused class pairs) are removed by "anchors_removed" and marked on the maps.
    `images`: dataset rows (default the sweep's held-out images, the first `n_images`).

    Under torch.distributed (torchrun, or `group`, a process group) each rank patches its share
    of the image batches (whole, as in one process), the per-image values are gathered in batch
    order and every rank returns the result one process would; the mean adapter output of
    "anchors_removed" is computed whole on every rank, so each corrupted run is the same.
    """
    if corruption not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {corruption!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    probed = {h for c, h in sweep.probes if c == "model"}
    reference = model.resolve_hook_name(reference)
    llm_sites = [s.hook for s in sweep.sites if s.stage == "llm"]
    readout = model.resolve_hook_name(readout) if readout is not None else (llm_sites[-1] if llm_sites else None)
    missing = [h for h in (reference, readout) if h not in probed]
    if readout is None or missing:
        raise ValueError(f"the sweep has no probe at {missing or 'any LLM site'}; rerun probe_sweep with "
                         f"sites including {reference!r} and an LLM layer (probed: {sorted(probed)})")
    ref_probe, out_probe = sweep.probes[("model", reference)], sweep.probes[("model", readout)]
    recovered = TokenGroup.probe_wrong(ref_probe, reference) & TokenGroup.probe_correct(out_probe, readout)
    if anchors is None:
        anchors = anchor_groups(sweep, reference, pair_classes(conflicting_pairs(sweep, reference, 4)))[0]
    scored_group = _scored_tokens(tokens, sweep.class_names, recovered)
    if corruption == "anchors_removed" and tokens == "objects":  # the anchors' own tokens cannot be restored by heads
        scored_group = scored_group - anchors
    indices = np.asarray(sweep.test_indices if images is None else images)[:n_images]
    if len(indices) < 2:
        raise ValueError("the study needs at least 2 images (intervals are over images)")
    settings = sweep.settings
    window = list(range(model.cfg.n_layers)) if window is None else sorted(set(window))
    mean = None
    if corruption == "anchors_removed":
        train = np.asarray(sweep.train_indices)[:64]
        mean = mean_adapter_output(model, (b.inputs for b in labelled_batches(model, sweep.dataset, train,
                                                                               batch_size=batch_size, prompt=settings.prompt)))
    layers, conditions = head_conditions(model, hook)
    n_heads = model.cfg.llm.n_heads

    # each rank prepares and patches its own batches (whole, as in one process); the per-image
    # values are gathered in batch order, so the tables below are made from every image
    batches = rank_batches(model, sweep.dataset, indices, batch_size=batch_size, group=group, prompt=settings.prompt,
                           min_valid_fraction=settings.min_valid_fraction, progress=progress,
                           desc="recovery heads: clean and corrupted runs")
    head_hooks = [f"blocks.{l}.attn.hook_{hook}" for l in layers]
    prepared = {}  # this rank's batch numbers -> (clean run, corrupted run, metric, batch, clean activations, n recovered)
    for b, batch in batches:
        inputs, labels = batch.inputs, batch.labels["llm"]
        clean_acts = run_and_collect(model, Run(inputs), [reference, readout, *head_hooks])  # reused as the source
        context = GroupContext(token_labels=labels.labels, model=model, activations=clean_acts,
                               ignore_index=sweep.ignore_index)
        metric = probe_metric(model, out_probe, readout, inputs, labels, tokens=scored_group, context=context)
        corrupted = _corrupt(model, corruption, inputs, window, anchors, context, mean, sweep.dataset,
                             indices, batch, seed + b)
        n_recovered = inputs.layout.by_image(recovered.resolve(inputs, context)).sum(1)
        prepared[b] = (Run(inputs, name="clean"), corrupted, metric, batch, clean_acts, n_recovered)

    parts = []  # (batch number, per-image values of that batch), moved to the CPU to be gathered
    bar = tqdm(total=distributed.share(len(indices), batch_size, group), disable=not progress,
               desc="recovery heads: patching every head", unit="image")
    for b, (clean, corrupted, metric, batch, acts, n_recovered) in prepared.items():
        found = {"clean": evaluate(metric, acts, clean.inputs).cpu(), "corrupted": baseline(model, corrupted, metric).cpu()}
        values = patch_conditions(model, clean, corrupted, metric, conditions, chunk_size=chunk_size,
                                  source_activations=acts, progress=progress)
        found["exact"] = values.view(len(layers), n_heads, -1).cpu()
        if attribution:
            found["attribution"] = attribution_patching(model, clean, corrupted, metric, hook=hook).per_head().cpu()
        found["recovered"] = n_recovered.cpu()
        parts.append((b, found))
        bar.update(len(batch.indices))
    bar.close()
    parts = distributed.gather_in_order(parts, group)
    clean_m = torch.cat([p["clean"] for p in parts]).numpy()
    corrupt_m = torch.cat([p["corrupted"] for p in parts]).numpy()
    patched = torch.cat([p["exact"] for p in parts], dim=-1).numpy()
    keep = np.isfinite(clean_m) & np.isfinite(corrupt_m)  # images with at least one scored token
    if keep.sum() < 2:
        raise ValueError(f"only {int(keep.sum())} image(s) have tokens to score with tokens={tokens!r}; "
                         "use more images or a broader token set ('objects', 'all')")
    effects = (patched - corrupt_m)[..., keep]
    gap = (clean_m - corrupt_m)[keep]
    attr = torch.cat([p["attribution"] for p in parts], dim=-1).numpy()[..., keep] if attribution else None
    resamples = bootstrap_indices(int(keep.sum()), n_boot, seed)
    table = _head_table(effects, gap, attr, resamples, layers)
    top = list(zip(table.layer[:top_k].astype(int), table["head"][:top_k].astype(int)))

    together = []  # cumulative: best 1, best 2, ..., best top_k heads patched at once
    nested = [[Patch(f"blocks.{l}.attn.hook_{hook}", heads=(h,)) for l, h in top[:k]] for k in range(1, len(top) + 1)]
    for b, (clean, corrupted, metric, _, acts, _) in prepared.items():
        together.append((b, patch_conditions(model, clean, corrupted, metric, nested, chunk_size=chunk_size,
                                             source_activations=acts, progress=progress).cpu()))
    together = torch.cat(distributed.gather_in_order(together, group), dim=-1).numpy()[..., keep] - corrupt_m[keep]
    top_table = _top_k_table(together, gap, resamples, top)

    corr = rank_correlation(effects.mean(-1), attr.mean(-1)) if attribution else float("nan")
    low, high = percentile_interval([gap[i].mean() for i in resamples])
    table, top_table = (withhold_fractions(frame, low, high) for frame in (table, top_table))
    summary = {"clean_metric": float(clean_m[keep].mean()), "corrupted_metric": float(corrupt_m[keep].mean()),
               "gap": float(gap.mean()), "gap_low": low, "gap_high": high,
               "gap_excludes_zero": excludes_zero(low, high),  # fractions restored are withheld otherwise
               "rank_correlation": corr,
               "top_k_fraction_restored": float(top_table.fraction_restored.iloc[-1]),
               "n_images": int(keep.sum()), "n_images_without_scored_tokens": int((~keep).sum())}
    counts = torch.cat([p["recovered"] for p in parts]).numpy()
    maps = _recovery_maps(model, prepared, batch_size, counts, top, anchors, recovered, sweep, n_maps, group)
    return RecoveryHeadsResult(
        table=table, top_k=top_table, layers=sorted({l for l, _ in top}), summary=summary,
        exact=effects, attribution=attr, maps=maps,
        settings={"corruption": corruption, "readout": readout, "reference": reference, "window": window,
                  "tokens": getattr(tokens, "description", tokens), "hook": hook, "top_k": top_k,
                  "metric": f"probe margin at {site_for(model, readout).label}", "n_boot": n_boot, "seed": seed,
                  "dataset_indices": indices.tolist()},
    )


def withhold_fractions(frame: pd.DataFrame, gap_low: float, gap_high: float) -> pd.DataFrame:
    """`frame` with its fraction-restored columns blanked when the gap's interval includes zero:
    a fraction of a gap that may be zero has no meaning (its interval runs off to infinity)."""
    if excludes_zero(gap_low, gap_high):
        return frame
    frame = frame.copy()
    frame[["fraction_restored", "fraction_low", "fraction_high"]] = np.nan
    return frame


def _scored_tokens(tokens, class_names, recovered: TokenGroup) -> TokenGroup | None:
    if isinstance(tokens, TokenGroup):
        return tokens
    if tokens == "all":
        return None
    if tokens == "recovered":
        return recovered
    if tokens == "objects":
        background = excluded_classes(class_names)
        objects = [i for i in range(len(class_names)) if i not in background]
        return TokenGroup.of_class(*objects)
    raise ValueError(f"tokens must be 'objects', 'all', 'recovered' or a TokenGroup, got {tokens!r}")


def _corrupt(model, corruption, inputs, window, anchors, context, mean, dataset, indices, batch, seed) -> Run:
    if corruption == "recovery_blocked":
        return recovery_blocked(model, inputs, window)
    if corruption == "anchors_removed":
        return anchors_removed(model, inputs, anchors, replacement="mean", mean=mean, context=context)
    # counterfactual: other images of the study, through the same prompts
    pool = np.setdiff1d(indices, batch.indices)
    if len(pool) < len(batch.indices):
        others = batch.indices[derangement(len(batch.indices), seed).numpy()]
    else:
        others = np.random.default_rng(seed).choice(pool, size=len(batch.indices), replace=False)
    return counterfactual_images(model, inputs, dataset[others.tolist()]["image"])



def _head_table(effects, gap, attr, resamples, layers) -> pd.DataFrame:
    n_layers, n_heads, _ = effects.shape
    rows = []
    for i, layer in enumerate(layers):
        for h in range(n_heads):
            e = effects[i, h]
            row = {"layer": layer, "head": h, "effect": float(e.mean())}
            row["effect_low"], row["effect_high"] = percentile_interval([e[s].mean() for s in resamples])
            row["fraction_restored"] = float(e.mean() / gap.mean())
            row["fraction_low"], row["fraction_high"] = percentile_interval([e[s].mean() / gap[s].mean() for s in resamples])
            row["attribution"] = float(attr[i, h].mean()) if attr is not None else float("nan")
            rows.append(row)
    # restoring means moving the metric from the corrupted value towards the clean one
    direction = -1.0 if gap.mean() < 0 else 1.0
    table = pd.DataFrame(rows)
    table = table.iloc[np.argsort(-direction * table.effect.to_numpy(), kind="stable")].reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    if attr is not None:
        table["attribution_rank"] = (direction * table.attribution).rank(ascending=False, method="min").astype(int)
    return table


def _top_k_table(together, gap, resamples, top) -> pd.DataFrame:
    rows = []
    for k in range(1, len(top) + 1):
        e = together[k - 1]
        low, high = percentile_interval([e[s].mean() / gap[s].mean() for s in resamples])
        rows.append({"k": k, "heads": ", ".join(f"L{l}H{h}" for l, h in top[:k]), "effect": float(e.mean()),
                     "fraction_restored": float(e.mean() / gap.mean()), "fraction_low": low, "fraction_high": high})
    return pd.DataFrame(rows)


@torch.no_grad()
def _recovery_maps(model, prepared, batch_size, counts, top, anchors, recovered, sweep, n_maps, group) -> list[RecoveryMap]:
    """Clean attention of the top heads from the recovered tokens (or, in images without any,
    from all labelled object tokens, flagged in `query_kind`) of the images with the most
    recovered tokens. `prepared`: this rank's batches by number; each map is drawn by the rank
    that holds its image's batch, and the maps are gathered in order."""
    if n_maps < 1:
        return []
    order = np.argsort(-counts, kind="stable")[:n_maps]
    heads: dict[int, list[int]] = {}
    for l, h in top:
        heads.setdefault(l, []).append(h)
    names = [f"blocks.{l}.attn.hook_pattern" for l in heads]
    maps = []
    for place, image in enumerate(order):
        b, k = divmod(int(image), batch_size)  # image i of the study is in batch i // batch_size
        if b not in prepared:
            continue
        clean, _, _, batch, _, _ = prepared[b]
        inputs, labels = clean.inputs, batch.labels["llm"]
        context = GroupContext(token_labels=labels.labels, model=model, ignore_index=sweep.ignore_index)
        span = inputs.layout.spans[k]
        n = len(span.positions)
        queries = recovered.resolve(inputs, context)[span.row, span.positions]
        query_kind = "recovered"
        if not queries.any():
            background = torch.tensor(excluded_classes(sweep.class_names), dtype=torch.long)
            queries = labels.valid[k][:n] & ~torch.isin(labels.labels[k][:n], background)
            query_kind = "objects"
        anchor_tokens = anchors.resolve(inputs, context)[span.row, span.positions]
        # the map is drawn over the image's finest segment (its only one for a fixed grid)
        start, segment = _finest_segment(span)
        shown = slice(start, start + len(segment.positions))
        found = run_and_collect(model, clean, names)
        positions = span.positions.to(model.cfg.device)
        keys = segment.positions.to(model.cfg.device)
        attention = {}
        for l, hs in heads.items():
            pattern = found[f"blocks.{l}.attn.hook_pattern"][span.row, hs]  # [heads, query, key]
            from_queries = pattern[:, positions[queries.to(positions.device)]][:, :, keys]
            attention[l] = from_queries.float().mean((0, 1)).view(segment.tokens.shape).cpu().numpy()
        picture = _model_view(model, model.architecture.image_pixels(inputs.pixel_values, span.image_index, span=span,
                                                                      **inputs.extra, **inputs.layout_inputs))
        maps.append((place, RecoveryMap(int(batch.indices[k]), picture, segment.tokens.shape,
                                        queries[shown].nonzero().flatten().tolist(),
                                        anchor_tokens[shown].nonzero().flatten().tolist(),
                                        attention, {l: sorted(hs) for l, hs in heads.items()}, query_kind)))
    return distributed.gather_in_order(maps, group)


def _finest_segment(span):
    """(first index in `span.positions`, segment) of the image's segment with the most tokens."""
    starts = np.cumsum([0] + [len(s.positions) for s in span.segments])
    best = max(range(len(span.segments)), key=lambda i: len(span.segments[i].positions))
    return int(starts[best]), span.segments[best]


def _model_view(model, pixels: torch.Tensor) -> np.ndarray:
    """The preprocessed image as the model sees it (normalisation undone), [h, w, 3] uint8 (for a
    tiled image, its base tile: the whole image at the tower's size)."""
    processor = getattr(model.processor, "image_processor", None)
    mean = torch.tensor(getattr(processor, "image_mean", (0.0, 0.0, 0.0)))[:, None, None]
    std = torch.tensor(getattr(processor, "image_std", (1.0, 1.0, 1.0)))[:, None, None]
    if pixels.ndim == 4:  # tiles of one image (anyres): the first is the whole image, squashed
        pixels = pixels[0]
    image = (pixels.float().cpu() * std + mean).clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
