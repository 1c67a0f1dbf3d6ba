"""Recovery heads: which LLM attention heads bring segmentation information back?

Corrupt the run so recovery cannot happen (image -> image attention blocked in the LLM, anchors
removed at the adapter, or another scene), then patch each head's clean output (`hook_z`) into
the corrupted run, one head at a time, and score the image tokens with the sweep's probe at a
readout layer (true-class logit margin). A head's effect is the metric it restores, per image;
intervals are bootstrap resamples of the images. The heads are chosen on one set of images and
scored on another (by default a seeded half each of the held-out images): every head is patched
alone on the selection images, which rank them; the top-k are then patched together on the
scoring images, whose gap and fraction restored are the study's headline, so the choice does
not flatter the score. Images the sweep trained its probes on are never scored. Attribution
patching estimates the per-head effects in one backward pass. Attention recovery maps show
where the top heads look on scoring images, from tokens the adapter gets wrong and the readout
gets right, over the image grid, with the anchors marked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from .. import distributed
from ..interventions import GroupContext, TokenGroup
from ..interventions.attribution import attribution_patching, rank_correlation
from ..interventions.corruptions import anchors_removed, counterfactual_images, derangement, mean_adapter_output, recovery_blocked
from ..interventions.patching import Patch, Run, baseline, evaluate, head_conditions, patch_conditions, run_and_collect
from ..interventions.patching_metrics import probe_metric
from ..model import HookedMLLM
from ..probing.batches import labelled_batches, rank_batches
from ..probing.sites import site_for
from ..resampling import DEFAULT_N_BOOT, bootstrap_indices, check_n_boot, resample_counts
from .anchors import anchor_groups, conflicting_pairs, excluded_classes, pair_classes, refuse_empty
from ..display import result_html
from ..progress import progress_bar
from ..errors import InputError
from ..findings import ZERO_WIDTH, effect_phrase, excludes_zero, verdict
from .intervals import percentile_interval
from .pictures import picture_as_seen

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
    """`table`: one row per LLM head, best first, measured on the selection images (effect =
    change of the metric when that head's clean output is patched into the corrupted run, mean
    over images, with a 95% bootstrap interval; best = moving it furthest towards the clean value,
    so a negative gap ranks the most negative effects first; `effect_simultaneous_low/high`: an
    interval covering every head at once, for reading any head of many; `chosen_in`: how often a
    bootstrap resample of the selection images puts the head in the top k; `fraction_restored` =
    effect / the selection images' gap, withheld (NaN) unless that gap's interval lies above zero). `top_k`:
    the best k heads patched together, k = 1..top_k, on the scoring images (effect and fraction
    of the scoring images' gap, with intervals). `summary`: the scoring images' metric and gap
    (`gap*`), the selection images' gap (`selection_gap*`) and the image counts; `settings`
    lists the dataset rows that chose (`selection_indices`) and that scored (`scoring_indices`)."""

    table: pd.DataFrame
    top_k: pd.DataFrame
    layers: list[int]  # layers holding the top-k heads
    summary: dict[str, float]
    exact: np.ndarray = field(repr=False)  # [layer, head, selection image] effect per image
    attribution: np.ndarray | None = field(repr=False)  # [layer, head, selection image] estimated effect
    maps: list[RecoveryMap] = field(repr=False, default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def top_heads(self) -> list[tuple[int, int]]:
        k = self.settings["top_k"]
        return list(zip(self.table.layer[:k].astype(int), self.table["head"][:k].astype(int)))

    def findings(self) -> list[str]:
        """The gap the corruption opens on the scoring images and what the top heads (chosen on the
        selection images) restore there, worded from the intervals: fractions are given only for a
        gap whose interval lies above zero (a corruption that raises the metric leaves no gap to
        restore; a zero-width interval, all resamples agreeing, is no interval)."""
        s, corruption = self.summary, self.settings.get("corruption", "corruption")
        n_chose = s.get("n_selection_images")
        chose = f"; heads chosen on {n_chose} other images" if n_chose is not None else ""
        lines = [f"{corruption}: probe margin {s['clean_metric']:.3f} clean, {s['corrupted_metric']:.3f} corrupted "
                 f"(gap {effect_phrase(s['gap'], s['gap_low'], s['gap_high'])}, {s.get('n_scoring_images', s['n_images'])} "
                 f"scoring images{chose})"]
        where = verdict(s["gap_low"], s["gap_high"])
        if where == "above zero":
            best = self.top_k.iloc[-1]
            stable = ""
            if "chosen_in" in self.table:
                k = len(best.heads.split(", "))
                stable = (f" (each in the top {k} of at least {self.table.chosen_in[:k].min():.0%} of bootstrap "
                          "resamples of the selection images)")
            lines.append(f"top heads {best.heads}{stable} restore {best.fraction_restored:.2f} of the gap "
                         f"[{best.fraction_low:.2f}, {best.fraction_high:.2f}]; exact vs attribution Spearman "
                         f"{s['rank_correlation']:.2f}")
        elif where == "below zero":
            lines.append("the corruption raises the metric; there is no gap to restore, so no fraction restored is "
                         "given")
        elif where in (ZERO_WIDTH, "no interval"):
            lines.append(f"fractions of the gap restored are withheld: the gap has {where}")
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


@dataclass(frozen=True)
class _Spec:
    """What every batch of one study shares."""

    sweep: Any
    corruption: str
    reference: str
    readout: str
    out_probe: Any
    scored_group: TokenGroup | None
    anchors: TokenGroup
    recovered: TokenGroup
    window: list[int]
    mean: torch.Tensor | None
    head_hooks: list[str]
    batch_size: int
    seed: int


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
    layers: Sequence[int] | None = None,
    images: Sequence[int] | None = None,
    n_images: int | None = 64,
    selection_images: Sequence[int] | None = None,
    top_k: int = 4,
    attribution: bool = True,
    n_maps: int = 2,
    n_boot: int = DEFAULT_N_BOOT,
    batch_size: int = 16,
    chunk_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
    group: Any = None,
) -> RecoveryHeadsResult:
    """Rank the LLM's heads by how much of the probe margin at `readout` they restore, on some
    images, and score the best `top_k` together on others.

    `sweep`: a `probe_sweep` with probes at `reference` and `readout` (default: its last LLM
    site). `corruption`: "recovery_blocked" (image -> image attention knocked out in `window`,
    default every LLM layer), "anchors_removed" (anchor tokens' adapter output replaced by the
    mean adapter output of training images) or "counterfactual" (each image swapped for another
    of the same half of the study, same prompt). `tokens` scored by the metric: "objects"
    (labelled tokens not of a background class; minus the anchors under "anchors_removed"), "all"
    labelled tokens, "recovered" (wrong at `reference`, right at `readout`) or a TokenGroup.
    `anchors` (default: tokens the reference probe gets right in the 4 most confused class pairs)
    are removed by "anchors_removed" and marked on the maps. Scored tokens (or, under
    "anchors_removed", anchors) that no image holds are refused (InputError). `layers`: the LLM
    layers whose heads are patched and ranked (default every layer; a hybrid model's linear-attention
    layers have no heads and are refused by name, so pass its full-attention layers, and the same as
    `window` under "recovery_blocked").

    `images`: dataset rows (default the sweep's held-out images, the first `n_images`); images
    the sweep trained its probes on are refused. They are split, seeded by `seed` and by image,
    into a selection half, on which every head is patched alone and the top-k are chosen, and a
    scoring half, on which the top-k are patched together and the gap is measured. With
    `selection_images` (dataset rows, e.g. the sweep's training images, where choices belong)
    the heads are chosen on those and every image of `images` is scored; the two must not share
    an image.

    Under torch.distributed (torchrun, or `group`, a process group) each rank patches its share
    of the image batches (whole, as in one process), the per-image values are gathered in batch
    order and every rank returns the result one process would; the mean adapter output of
    "anchors_removed" is computed whole on every rank, so each corrupted run is the same.
    """
    check_n_boot(n_boot)  # before the patching, not after it
    if corruption not in CORRUPTIONS:
        raise InputError(f"corruption must be one of {CORRUPTIONS}, got {corruption!r}")
    if top_k < 1:
        raise InputError(f"top_k must be at least 1, got {top_k}")
    reference, readout = _probed_sites(model, sweep, reference, readout)
    ref_probe, out_probe = sweep.probes[("model", reference)], sweep.probes[("model", readout)]
    recovered = TokenGroup.probe_wrong(ref_probe, reference) & TokenGroup.probe_correct(out_probe, readout)
    if anchors is None:
        anchors = anchor_groups(sweep, reference, pair_classes(conflicting_pairs(sweep, reference, 4)))[0]
    scored_group = _scored_tokens(tokens, sweep.class_names, recovered)
    if corruption == "anchors_removed" and tokens == "objects":  # the anchors' own tokens cannot be restored by heads
        scored_group = scored_group - anchors
    chosen_on, scored_on = _split_images(sweep, images, n_images, selection_images, seed)
    settings = sweep.settings
    window = list(range(model.cfg.n_layers)) if window is None else sorted(set(window))
    mean = None
    if corruption == "anchors_removed":
        train = np.asarray(sweep.train_indices)[:64]
        mean = mean_adapter_output(model, (b.inputs for b in labelled_batches(model, sweep.dataset, train,
                                                                               batch_size=batch_size, prompt=settings.prompt)))
    layers, conditions = head_conditions(model, hook, layers)
    n_heads = model.cfg.llm.n_heads
    spec = _Spec(sweep, corruption, reference, readout, out_probe, scored_group, anchors, recovered, window, mean,
                 [f"blocks.{l}.attn.hook_{hook}" for l in layers], batch_size, seed)

    # both halves are prepared (clean and corrupted runs, per-image counts gathered) before any
    # patching, so an empty token group is refused before the expensive part
    selection = _prepare(model, spec, chosen_on, "selection", progress, group)
    scoring = _prepare(model, spec, scored_on, "scoring", progress, group)
    _refuse_degenerate(spec, tokens, selection, scoring)

    def every_head(clean, corrupted, metric, acts) -> dict[str, torch.Tensor]:
        values = patch_conditions(model, clean, corrupted, metric, conditions, chunk_size=chunk_size,
                                  source_activations=acts, progress=progress)
        found = {"exact": values.view(len(layers), n_heads, -1)}
        if attribution:
            found["attribution"] = attribution_patching(model, clean, corrupted, metric, hook=hook,
                                                        layers=layers).per_head()
        return found

    # selection images: every head alone; they rank the heads and choose the top k
    chose = _measure(model, selection, every_head, "recovery heads: patching every head (selection images)",
                     progress, group)
    selection.prepared.clear()  # its runs and activations are not needed again
    keep = chose["keep"]
    effects = (chose["exact"] - chose["corrupted"])[..., keep]
    selection_gap = (chose["clean"] - chose["corrupted"])[keep]
    attr = chose["attribution"][..., keep] if attribution else None
    chose_resamples = bootstrap_indices(int(keep.sum()), n_boot, seed)
    table = _head_table(effects, selection_gap, attr, chose_resamples, layers, top_k)
    top = list(zip(table.layer[:top_k].astype(int), table["head"][:top_k].astype(int)))
    nested = [[Patch(f"blocks.{l}.attn.hook_{hook}", heads=(h,)) for l, h in top[:k]] for k in range(1, len(top) + 1)]

    def together(clean, corrupted, metric, acts) -> dict[str, torch.Tensor]:
        return {"together": patch_conditions(model, clean, corrupted, metric, nested, chunk_size=chunk_size,
                                             source_activations=acts, progress=progress)}

    # scoring images: the chosen heads together, and the gap they are a fraction of
    scored = _measure(model, scoring, together, "recovery heads: top heads together (scoring images)", progress, group)
    kept = scored["keep"]
    gap = (scored["clean"] - scored["corrupted"])[kept]
    resamples = bootstrap_indices(int(kept.sum()), n_boot, seed)
    top_table = _top_k_table(scored["together"][..., kept] - scored["corrupted"][kept], gap, resamples, top)
    gaps = {"gap": _mean_interval(gap, resamples), "selection_gap": _mean_interval(selection_gap, chose_resamples)}
    # each table's fractions are of its own images' gap
    table = withhold_fractions(table, *gaps["selection_gap"][1:])
    top_table = withhold_fractions(top_table, *gaps["gap"][1:])
    corr = rank_correlation(effects.mean(-1), attr.mean(-1)) if attribution else float("nan")
    summary = _summary(chose, scored, gaps, corr, top_table)
    maps = _recovery_maps(model, scoring.prepared, batch_size, scoring.counts["recovered"], top, anchors, recovered,
                          sweep, n_maps, group)
    return RecoveryHeadsResult(
        table=table, top_k=top_table, layers=sorted({l for l, _ in top}), summary=summary,
        exact=effects, attribution=attr, maps=maps,
        settings={"corruption": corruption, "readout": readout, "reference": reference, "window": window,
                  "head_layers": layers,
                  "tokens": getattr(tokens, "description", tokens), "hook": hook, "top_k": top_k,
                  "metric": f"probe margin at {site_for(model, readout).label}", "n_boot": n_boot, "seed": seed,
                  "selection": "given" if selection_images is not None else "seeded half of the images",
                  "selection_indices": chosen_on.tolist(), "scoring_indices": scored_on.tolist(),
                  "dataset_indices": np.concatenate([chosen_on, scored_on]).tolist()},
    )


def _mean_interval(values: np.ndarray, resamples: np.ndarray) -> tuple[float, float, float]:
    """The mean of per-image values and its 95% bootstrap interval."""
    return (float(values.mean()), *percentile_interval([values[i].mean() for i in resamples]))


def _summary(chose: dict, scored: dict, gaps: dict, rank_corr: float, top_table: pd.DataFrame) -> dict[str, float]:
    """The headline numbers, each a plain number (the run report tabulates them): the scoring
    images' metric and gap, the selection images' gap, and the images each half scored."""
    keep, kept = chose["keep"], scored["keep"]
    out = {"clean_metric": float(scored["clean"][kept].mean()),
           "corrupted_metric": float(scored["corrupted"][kept].mean())}
    for name, (mean, low, high) in gaps.items():
        out |= {name: mean, f"{name}_low": low, f"{name}_high": high}
    out["gap_excludes_zero"] = excludes_zero(out["gap_low"], out["gap_high"])  # fractions need it above zero
    return out | {"rank_correlation": rank_corr, "top_k_fraction_restored": float(top_table.fraction_restored.iloc[-1]),
                  "n_images": int(keep.sum() + kept.sum()), "n_selection_images": int(keep.sum()),
                  "n_scoring_images": int(kept.sum()),
                  "n_images_without_scored_tokens": int((~keep).sum() + (~kept).sum())}


def withhold_fractions(frame: pd.DataFrame, gap_low: float, gap_high: float) -> pd.DataFrame:
    """`frame` with its fraction-restored columns blanked unless the gap's interval lies wholly
    above zero: a fraction of a gap that may be zero has no meaning (its interval runs off to
    infinity), a corruption that raises the metric (gap below zero) leaves nothing to restore, and
    a zero-width interval (all resamples agree) is no interval."""
    if verdict(gap_low, gap_high) == "above zero":
        return frame
    frame = frame.copy()
    frame[["fraction_restored", "fraction_low", "fraction_high"]] = np.nan
    return frame


def _probed_sites(model, sweep, reference: str, readout: str | None) -> tuple[str, str]:
    """(reference, readout) resolved, after checking the sweep has a probe at each."""
    probed = {h for c, h in sweep.probes if c == "model"}
    reference = model.resolve_hook_name(reference)
    llm_sites = [s.hook for s in sweep.sites if s.stage == "llm"]
    readout = model.resolve_hook_name(readout) if readout is not None else (llm_sites[-1] if llm_sites else None)
    missing = [h for h in (reference, readout) if h not in probed]
    if readout is None or missing:
        raise InputError(f"the sweep has no probe at {missing or 'any LLM site'}; rerun probe_sweep with "
                         f"sites including {reference!r} and an LLM layer (probed: {sorted(probed)})")
    return reference, readout


def _split_images(sweep, images, n_images, selection_images, seed) -> tuple[np.ndarray, np.ndarray]:
    """(selection, scoring) dataset rows: `selection_images` and the study's images, or the study's
    images split in two by a seeded permutation (each image whole in one half, the halves in the
    images' order). Scoring images must be held out from the sweep's probes."""
    study = np.asarray(sweep.test_indices if images is None else images, dtype=np.int64)[:n_images]
    trained = np.intersect1d(study, np.asarray(sweep.train_indices))
    if len(trained):
        raise InputError(f"{len(trained)} of the images (dataset rows {trained[:8].tolist()}"
                         f"{'...' if len(trained) > 8 else ''}) trained the sweep's probes; a head's effect scored on "
                         "them measures the probes' fit to their own training images. Score held-out images (the "
                         "default, sweep.test_indices); training images may choose the heads (selection_images=)")
    if selection_images is None:
        if len(study) < 4:
            raise InputError(f"the study needs at least 4 images, 2 to choose the heads on and 2 to score them "
                             f"(intervals are over images); got {len(study)}")
        chosen = np.zeros(len(study), dtype=bool)
        chosen[np.random.default_rng(seed).permutation(len(study))[: len(study) // 2]] = True
        return study[chosen], study[~chosen]
    selection = np.asarray(selection_images, dtype=np.int64)
    shared = np.intersect1d(selection, study)
    if len(shared):
        raise InputError(f"dataset rows {shared[:8].tolist()} are both in selection_images and among the scored "
                         "images; heads chosen on an image would be scored on it. Pass disjoint sets")
    if len(selection) < 2 or len(study) < 2:
        raise InputError(f"the study needs at least 2 selection and 2 scoring images (intervals are over images); "
                         f"got {len(selection)} and {len(study)}")
    return selection, study


@dataclass
class _Half:
    """One set of the study's images: this rank's prepared batches (batch number -> clean run,
    corrupted run, metric, batch, clean activations) and, gathered from every rank, per-image counts
    of scored tokens, anchors and recovered tokens."""

    name: str
    indices: np.ndarray
    batch_size: int
    prepared: dict
    counts: dict[str, np.ndarray]


def _prepare(model, spec: _Spec, indices: np.ndarray, name: str, progress: bool, group) -> _Half:
    """Clean and corrupted runs of this rank's batches of `indices` (whole, as in one process)."""
    settings, prepared, counts = spec.sweep.settings, {}, []
    for b, batch in rank_batches(model, spec.sweep.dataset, indices, batch_size=spec.batch_size, group=group,
                                 prompt=settings.prompt, min_valid_fraction=settings.min_valid_fraction,
                                 progress=progress, desc=f"recovery heads: clean and corrupted runs ({name} images)"):
        inputs, labels = batch.inputs, batch.labels["llm"]
        clean_acts = run_and_collect(model, Run(inputs), [spec.reference, spec.readout, *spec.head_hooks])
        context = GroupContext(token_labels=labels.labels, model=model, activations=clean_acts,
                               ignore_index=spec.sweep.ignore_index)
        metric = probe_metric(model, spec.out_probe, spec.readout, inputs, labels, tokens=spec.scored_group,
                              context=context)
        # the counterfactual draws its images from this half only: the other half cannot move its result
        corrupted = _corrupt(model, spec.corruption, inputs, spec.window, spec.anchors, context, spec.mean,
                             spec.sweep.dataset, indices, batch, spec.seed)
        prepared[b] = (Run(inputs, name="clean"), corrupted, metric, batch, clean_acts)
        by_image = inputs.layout.by_image
        counts.append((b, {"scored": metric.n_scored,
                           "anchors": by_image(spec.anchors.resolve(inputs, context)).sum(1).cpu(),
                           "recovered": by_image(spec.recovered.resolve(inputs, context)).sum(1).cpu()}))
    counts = distributed.gather_in_order(counts, group)
    return _Half(name, indices, spec.batch_size, prepared, {key: torch.cat([c[key] for c in counts]).numpy()
                                           for key in ("scored", "anchors", "recovered")})


def _refuse_degenerate(spec: _Spec, tokens, selection: _Half, scoring: _Half) -> None:
    """InputError for a scored-token group (or, when it is what the corruption removes, an anchor
    group) that no image holds, and for a half with fewer than 2 images to score: their gap would
    be 0.000 [0.000, 0.000] or NaN, and fractions of it would read as findings."""
    described = spec.scored_group.description if spec.scored_group is not None else "labelled image tokens"
    name = f"scored tokens (tokens={getattr(tokens, 'description', tokens)!r})"
    both = np.concatenate([selection.counts["scored"], scoring.counts["scored"]])
    refuse_empty(name, described, both, "use more images or a broader token set ('objects', 'all')")
    if spec.corruption == "anchors_removed":
        refuse_empty("anchors", spec.anchors.description,
                     np.concatenate([selection.counts["anchors"], scoring.counts["anchors"]]),
                     "pass anchors= that the images hold, or another corruption")
    for half in (selection, scoring):
        n = int((half.counts["scored"] > 0).sum())
        if n < 2:
            raise InputError(f"only {n} of the {len(half.indices)} {half.name} images hold {name}; intervals need at "
                             "least 2: use more images or a broader token set ('objects', 'all')")


def _measure(model, half: _Half, patch, desc: str, progress: bool, group) -> dict[str, np.ndarray]:
    """Per image of `half`, gathered in study order: the clean and corrupted metric, what
    `patch(clean, corrupted, metric, activations)` returns (images on the last axis), and `keep`
    (images with a scored token, the only ones a statistic is made of)."""
    parts = []
    bar = progress_bar(total=distributed.share(len(half.indices), half.batch_size, group), enabled=progress,
                       desc=desc, unit="image")
    for b, (clean, corrupted, metric, batch, acts) in half.prepared.items():
        found = {"clean": evaluate(metric, acts, clean.inputs), "corrupted": baseline(model, corrupted, metric),
                 **patch(clean, corrupted, metric, acts)}
        parts.append((b, {key: value.cpu() for key, value in found.items()}))
        bar.update(len(batch.indices))
    bar.close()
    parts = distributed.gather_in_order(parts, group)
    out = {key: torch.cat([p[key] for p in parts], dim=-1).numpy() for key in parts[0]}
    out["keep"] = np.isfinite(out["clean"]) & np.isfinite(out["corrupted"])
    return out


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
    raise InputError(f"tokens must be 'objects', 'all', 'recovered' or a TokenGroup, got {tokens!r}")


def _corrupt(model, corruption, inputs, window, anchors, context, mean, dataset, indices, batch, seed) -> Run:
    if corruption == "recovery_blocked":
        return recovery_blocked(model, inputs, window)
    if corruption == "anchors_removed":
        return anchors_removed(model, inputs, anchors, replacement="mean", mean=mean, context=context)
    # counterfactual: another image of the same half through the same prompt; the pairing is one
    # seeded derangement of the half's images, so it does not depend on how they are batched
    indices = np.asarray(indices)
    partner = dict(zip(indices.tolist(), indices[derangement(len(indices), seed).numpy()].tolist()))
    others = [partner[int(row)] for row in batch.indices]
    return counterfactual_images(model, inputs, dataset[others]["image"])



def _head_table(effects, gap, attr, resamples, layers, top_k: int = 1) -> pd.DataFrame:
    """Every head's mean effect on the selection images with its pointwise interval, its
    simultaneous interval over all heads (max-statistic), its fraction of the gap, and `chosen_in`:
    the fraction of bootstrap resamples of those images whose best `top_k` include it (how stable
    the choice is)."""
    n_layers, n_heads, n_images = effects.shape
    weights = resample_counts(resamples, n_images) / resamples.shape[1]  # weights @ values: each resample's mean
    means = effects.reshape(n_layers * n_heads, n_images) @ weights.T  # [heads, B]
    gaps = weights @ gap
    point = effects.reshape(n_layers * n_heads, n_images).mean(1)
    spread = means.std(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        deviation = np.abs(means - point[:, None]) / np.where(spread > 0, spread, np.nan)[:, None]
        critical = np.percentile(np.nanmax(np.nan_to_num(deviation, nan=0.0), axis=0), 95)
        fractions = means / gaps[None]
    # restoring means moving the metric from the corrupted value towards the clean one
    direction = -1.0 if gap.mean() < 0 else 1.0
    order = np.argsort(-direction * means, axis=0, kind="stable")[:top_k]  # [top_k, B]
    chosen_in = np.bincount(order.ravel(), minlength=len(point)) / means.shape[1]
    rows = []
    for index, (i, h) in enumerate(np.ndindex(n_layers, n_heads)):
        row = {"layer": layers[i], "head": h, "effect": float(point[index])}
        row["effect_low"], row["effect_high"] = percentile_interval(means[index])
        row["effect_simultaneous_low"] = float(point[index] - critical * spread[index])
        row["effect_simultaneous_high"] = float(point[index] + critical * spread[index])
        row["fraction_restored"] = float(point[index] / gap.mean())
        row["fraction_low"], row["fraction_high"] = percentile_interval(fractions[index])
        row["chosen_in"] = float(chosen_in[index])
        row["attribution"] = float(attr[i, h].mean()) if attr is not None else float("nan")
        rows.append(row)
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
        effect_low, effect_high = percentile_interval([e[s].mean() for s in resamples])
        low, high = percentile_interval([e[s].mean() / gap[s].mean() for s in resamples])
        rows.append({"k": k, "heads": ", ".join(f"L{l}H{h}" for l, h in top[:k]), "effect": float(e.mean()),
                     "effect_low": effect_low, "effect_high": effect_high,
                     "fraction_restored": float(e.mean() / gap.mean()), "fraction_low": low, "fraction_high": high})
    return pd.DataFrame(rows)


@torch.no_grad()
def _recovery_maps(model, prepared, batch_size, counts, top, anchors, recovered, sweep, n_maps, group) -> list[RecoveryMap]:
    """Clean attention of the top heads from the recovered tokens (or, in images without any,
    from all labelled object tokens, flagged in `query_kind`) of the images (of one set, the
    scoring images) with the most recovered tokens. `prepared`: that set's batches on this rank,
    by number; each map is drawn by the rank that holds its image's batch, and the maps are
    gathered in order."""
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
        clean, _, _, batch, _ = prepared[b]
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
        pixels = model.architecture.image_pixels(inputs.pixel_values, span.image_index, span=span,
                                                 **inputs.extra, **inputs.layout_inputs)
        picture = picture_as_seen(model, pixels)
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
