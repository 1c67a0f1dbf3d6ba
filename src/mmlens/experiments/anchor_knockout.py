"""Anchor knockout: is recovery in the LLM steered by the image tokens the probe already gets right?

From a probe sweep, take the class pairs the probe at a reference site confuses most on the
sweep's training images (never on the held-out images the knockout then scores). Tokens of
those classes it classifies correctly there are anchors; the others are the targets. Block the
attention edges anchor -> every other image token (information flow from anchors, in the LLM
layers after the reference) and read the targets out again with the sweep's own probes at every
later layer. The control blocks the same number of random tokens of the same classes in each
image (several seeds; each image's draw is seeded from the study seed, its dataset row and the
control number, so it does not depend on the batch the image is in); the scored targets stay
queries in every condition. Drawn from the same classes, the control shares tokens with the
anchors (`control_anchor_share`), which makes the anchors - control difference conservative.
Intervals are bootstrap resamples of the images, paired across conditions. Anchors or targets
that no image holds are refused; a zero-width interval is worded as no interval.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import distributed
from ..display import result_html
from ..progress import progress_bar
from ..errors import InputError
from ..findings import effect_phrase, verdict
from ..interventions import GroupContext, TokenGroup, knockout
from ..model import HookedMLLM
from ..model.hook_names import parse_hook_name
from ..probing.batches import rank_batches
from ..probing.metrics import SegmentationScores
from ..probing.predict import predict_image_tokens
from ..probing.sites import Site, site_for
from ..resampling import DEFAULT_N_BOOT, bootstrap_indices, check_n_boot
from .anchors import anchor_groups, conflicting_pairs, pair_classes, refuse_empty
from .intervals import percentile_interval, pooled_accuracy, pooled_miou

CONDITIONS = ("clean", "anchors", "control")
COMPARISONS = (("anchors", "clean"), ("control", "clean"), ("anchors", "control"))
METRICS = ("target_accuracy", "pair_miou", "miou")


@dataclass
class AnchorKnockoutResult:
    """What the anchor knockout measured; `table` per condition and readout site, `effects` as
    paired differences with intervals."""

    pairs: pd.DataFrame
    table: pd.DataFrame
    effects: pd.DataFrame
    reference: str
    layers: list[int]
    readouts: list[Site]
    anchors_per_image: float
    targets_per_image: float
    blocked_mass: float  # largest attention probability left on a blocked edge in any run
    control_anchor_share: float  # fraction of the control's blocked tokens that are anchors
    settings: dict = field(default_factory=dict)

    def figure(self, metric: str = "target_accuracy"):
        from ..viz.intervention_plots import plot_knockout_effect

        return plot_knockout_effect(self, metric)

    def findings(self) -> list[str]:
        """The headline in sentences: the anchors-minus-control effect at the last readout, worded
        from its interval (a zero-width one, all resamples agreeing, supports no direction)."""
        effects = self.effects
        last = self.readouts[-1].hook
        headline = effects[(effects.metric == "target_accuracy") & (effects.comparison == "anchors - control")
                           & (effects.hook == last)].iloc[0]
        effect = effect_phrase(headline.effect, headline.low, headline.high, signed=True)
        reading = {
            "below zero": "blocking the anchors hurts more than blocking as many other tokens",
            "above zero": "blocking the anchors hurts less than blocking as many other tokens",
        }.get(verdict(headline.low, headline.high),
              "no difference between blocking the anchors and blocking as many other tokens can be claimed")
        chosen = self.settings.get("pairs_chosen_on")
        chosen = f" (chosen on {chosen})" if chosen and chosen != "given" else ""
        return [
            f"pairs {', '.join(f'{a}/{b}' for a, b in zip(self.pairs.name_a, self.pairs.name_b))}"
            f"{chosen}; "
            f"{self.anchors_per_image:.1f} anchors and {self.targets_per_image:.1f} targets per image",
            f"target accuracy at {headline.site}, anchors blocked minus control: {effect} ({reading})",
        ]

    def _repr_html_(self) -> str:
        effects = self.effects[self.effects.metric == "target_accuracy"]
        return result_html("AnchorKnockoutResult", self.findings(), {"effects": effects, "pairs": self.pairs},
                           hint="result.figure() draws the curves per readout site.",
                           focus={"effects": effects.hook == self.readouts[-1].hook})  # the readout findings() words


def anchor_knockout(
    model: HookedMLLM,
    sweep,
    *,
    reference: str = "adapter.hook_out",
    layers: Iterable[int] | None = None,
    readouts: Sequence[str] | None = None,
    n_pairs: int = 4,
    pairs: pd.DataFrame | None = None,
    pairs_from: Sequence[int] | None = None,
    n_control: int = 3,
    images: Sequence[int] | None = None,
    batch_size: int = 16,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    progress: bool = False,
    group: Any = None,
) -> AnchorKnockoutResult | None:
    """Block anchors -> other image tokens and measure the targets with the sweep's probes.

    `reference`: the site whose probe defines the conflicting pairs and the anchors (any probed
    site on the LLM token grid). `layers`: the LLM layers whose attention is edited (default:
    every layer after the reference). `readouts`: probed sites to measure at (default: the
    reference and every probed LLM `hook_resid_post` in or after the window). `pairs`: a table
    from `conflicting_pairs` to use instead of the `n_pairs` most confused. `pairs_from`: the
    dataset rows whose confusion at the reference chooses the pairs (default: the sweep's training
    images, up to 256 of them), so that the images the knockout scores choose nothing. `images`:
    dataset rows scored (default: the sweep's held-out images, which its probes never saw). Anchors or targets
    that no image holds are refused (InputError): there would be nothing to measure.

    Under torch.distributed (torchrun, or `group`, a process group) each rank runs its share of
    the image batches (whole batches, as in one process) and the per-image counts go to rank 0 in
    batch order: rank 0 returns the result one process would, intervals included; other ranks None.
    """
    check_n_boot(n_boot)  # before the forwards, not after them
    if seed < 0:
        raise InputError(f"seed must be a non-negative int (it seeds numpy's SeedSequence), got {seed}")
    reference = model.resolve_hook_name(reference)
    ref_site = site_for(model, reference)
    if ref_site.grid != "llm":
        raise InputError(f"the reference {reference!r} is a vision site; use a site on the LLM token grid "
                         "(adapter.hook_out, blocks.L.hook_resid_post, ...)")
    window = sorted(set(_default_window(model, ref_site) if layers is None else layers))
    if not window:
        raise InputError(f"no LLM layer comes after {reference!r}; pick an earlier reference or pass layers=")
    readout_names = _readouts(model, sweep, reference, window, readouts)
    indices = np.asarray(sweep.test_indices if images is None else images)
    chosen_on = "given"
    if pairs is None:
        choosing = np.asarray(sweep.train_indices[:PAIRS_FROM_TRAIN] if pairs_from is None else pairs_from)
        if np.intersect1d(choosing, indices).size:
            raise InputError("pairs_from and the scored images share rows: the images a study scores must not choose "
                             "its pairs; pass disjoint pairs_from= (default: the sweep's training images)")
        confusion = reference_confusion(model, sweep, reference, choosing, batch_size, group)
        pairs = conflicting_pairs(sweep, reference, n_pairs, confusion=confusion,
                                  where=f"the {len(choosing)} images that choose the pairs")
        chosen_on = f"{len(choosing)} {'training' if pairs_from is None else 'other'} images"
    classes = pair_classes(pairs)
    probes = {name: sweep.probes[("model", name)] for name in readout_names}
    anchors, targets = anchor_groups(sweep, reference, classes)
    if len(indices) < 2:
        raise InputError(f"the study needs at least 2 images (its intervals are over images), got {len(indices)}")
    settings = sweep.settings

    parts = []  # (batch number, its per-image counts): this rank's batches, gathered below
    # one forward per image and condition (clean, anchors, each control seed): the bar moves after each
    bar = progress_bar(total=distributed.share(len(indices), batch_size, group) * (2 + n_control),
                       desc="anchor knockout", unit="image run", enabled=progress)
    plan = _Plan(anchors, targets, TokenGroup.of_class(*classes), probes, readout_names, reference, window, n_control,
                 seed)
    for b, batch in rank_batches(model, sweep.dataset, indices, batch_size=batch_size, group=group,
                                 prompt=settings.prompt, min_valid_fraction=settings.min_valid_fraction):
        parts.append((b, _knockout_batch(model, sweep, batch, plan, bar)))
    bar.close()
    # per image in single-process order, whichever rank ran it; every statistic below is made from these
    parts = distributed.gather_to_main(parts, group)
    if parts is None:  # a rank other than 0: its counts are with rank 0, which makes the result
        return None
    counts = {key: np.concatenate([p["counts"][key] for p in parts]) for key in parts[0]["counts"]}
    correct = {key: np.concatenate([p["correct"][key] for p in parts]) for key in parts[0]["correct"]}
    scored = [p["scored"] for p in parts]
    n_anchors = [p["anchors"] for p in parts]
    blocked_mass = max(p["blocked_mass"] for p in parts)
    _refuse_empty_groups(pairs, reference, np.concatenate(n_anchors), np.concatenate(scored))
    overlap = [sum(p["overlap"][0] for p in parts), sum(p["overlap"][1] for p in parts)]

    runs_per_condition = {"clean": 1, "anchors": 1, "control": n_control}
    scored_tokens = {c: np.concatenate(scored) * runs_per_condition[c] for c in CONDITIONS}
    resamples = bootstrap_indices(len(indices), n_boot, seed)

    def statistic(condition: str, name: str, metric: str, index=None) -> float:
        if metric == "target_accuracy":
            return pooled_accuracy(correct[(condition, name)], scored_tokens[condition], index)
        return pooled_miou(counts[(condition, name)], index, classes if metric == "pair_miou" else None)

    readout_sites = [site_for(model, n) for n in readout_names]
    rows, effects = [], []
    for site in readout_sites:
        for condition in CONDITIONS:
            row = {"condition": condition, "hook": site.hook, "site": site.label, "layer": site.layer,
                   "n_target_tokens": int(scored_tokens["clean"].sum())}
            for metric in METRICS:
                row[metric] = statistic(condition, site.hook, metric)
                row[f"{metric}_low"], row[f"{metric}_high"] = percentile_interval(
                    [statistic(condition, site.hook, metric, idx) for idx in resamples])
            rows.append(row)
        for a, b in COMPARISONS:
            for metric in METRICS:
                diff = [statistic(a, site.hook, metric, idx) - statistic(b, site.hook, metric, idx) for idx in resamples]
                low, high = percentile_interval(diff)
                effects.append({"comparison": f"{a} - {b}", "hook": site.hook, "site": site.label, "layer": site.layer,
                                "metric": metric, "effect": statistic(a, site.hook, metric) - statistic(b, site.hook, metric),
                                "low": low, "high": high})
    return AnchorKnockoutResult(
        pairs=pairs,
        table=pd.DataFrame(rows),
        effects=pd.DataFrame(effects),
        reference=reference,
        layers=window,
        readouts=readout_sites,
        anchors_per_image=float(np.concatenate(n_anchors).mean()),
        targets_per_image=float(np.concatenate(scored).mean()),
        blocked_mass=blocked_mass,
        control_anchor_share=overlap[0] / overlap[1] if overlap[1] else float("nan"),
        settings={"n_images": len(indices), "n_control": n_control, "n_boot": n_boot, "seed": seed,
                  "classes": [sweep.class_names[c] for c in classes], "pairs_chosen_on": chosen_on},
    )


@dataclass(frozen=True)
class _Plan:
    """What every batch of one knockout study shares."""

    anchors: TokenGroup
    targets: TokenGroup
    same_classes: TokenGroup  # where the control draws its tokens
    probes: dict
    readout_names: list[str]
    reference: str
    window: list[int]
    n_control: int
    seed: int


def _knockout_batch(model, sweep, batch, plan: _Plan, bar) -> dict:
    """One batch's per-image counts under every condition: [tp, fp, fn] x class and
    correct target tokens per condition and readout, scored targets and anchors per image, the
    largest attention left on a blocked edge, and the control's blocked keys that are anchors
    (and all of them)."""
    inputs, labels = batch.inputs, batch.labels["llm"]
    probes, readout_names, n_classes = plan.probes, plan.readout_names, len(sweep.class_names)
    _, clean = model.run_with_cache(inputs, names_filter=sorted({plan.reference, *readout_names}), return_cache_object=False)
    context = GroupContext(token_labels=labels.labels, model=model, activations=clean, ignore_index=sweep.ignore_index)
    anchor_mask = plan.anchors.resolve(inputs, context)
    anchor_group = TokenGroup.from_mask(anchor_mask, "anchors")
    target_mask = plan.targets.resolve(inputs, context)
    target_tokens = inputs.layout.by_image(target_mask)
    scored_group = TokenGroup.from_mask(target_mask, "targets")
    predictions = {"clean": [predict_image_tokens(model, inputs, probes, activations=clean)]}
    bar.update(len(batch.indices))
    knocked = [("anchors", anchor_group)] + [
        ("control", TokenGroup.random_like(anchor_group, within=plan.same_classes,
                                           seed=_row_seeds(inputs, batch.indices, plan.seed, s)))
        for s in range(plan.n_control)
    ]
    blocked_mass, overlap = 0.0, [0, 0]
    for condition, keys in knocked:
        # scored targets stay queries in every condition, even when the control draws them as keys
        ko = knockout(model, inputs, queries=(TokenGroup.image() - keys) | scored_group, keys=keys, layers=plan.window,
                      verify=True, context=context, allow_empty=True)  # a batch may hold no anchors
        if condition == "control":
            drawn = keys.resolve(inputs, context)
            overlap[0] += int((drawn & anchor_mask).sum())
            overlap[1] += int(drawn.sum())
        predictions.setdefault(condition, []).append(predict_image_tokens(model, inputs, probes, fwd_hooks=ko.hooks))
        bar.update(len(batch.indices))
        blocked_mass = max(blocked_mass, *ko.blocked_mass.values())
    if blocked_mass != 0.0:
        raise RuntimeError(f"the knockout left attention {blocked_mass} on a blocked edge; it did not take effect")
    grid = inputs.layout.pixels("llm")
    counts, correct = {}, {}
    for condition, runs in predictions.items():
        for name in readout_names:
            segmentation = SegmentationScores(n_classes, sweep.ignore_index)
            hits = torch.zeros(target_tokens.shape, dtype=torch.long)
            for run in runs:  # control seeds pool their counts image by image
                segmentation.add(run[name], labels.labels, labels.valid, batch.masks, grid)
                hits += ((run[name] == labels.labels) & target_tokens).long()
            per_run = np.stack(segmentation.per_image).reshape(len(runs), len(batch.indices), 3, n_classes)
            counts[(condition, name)] = per_run.sum(0)
            correct[(condition, name)] = hits.sum(1).numpy()
    return {"counts": counts, "correct": correct, "scored": target_tokens.sum(1).numpy(),
            "anchors": inputs.layout.by_image(anchor_mask).sum(1).numpy(), "blocked_mass": blocked_mass,
            "overlap": overlap}


def _refuse_empty_groups(pairs: pd.DataFrame, reference: str, n_anchors: np.ndarray, n_targets: np.ndarray) -> None:
    """InputError naming the anchors or the targets when no image holds any: their knockout or
    their accuracy would be about nothing (a 0.000 [0.000, 0.000] effect, or NaN)."""
    names = ", ".join(f"{a}/{b}" for a, b in zip(pairs.name_a, pairs.name_b))
    refuse_empty("anchors", f"tokens of {names} the probe at {reference} gets right", n_anchors,
                 "pass other pairs= or images= holding those classes")
    refuse_empty("targets", f"tokens of {names} the probe at {reference} gets wrong", n_targets,
                 "pass other pairs= or images= where the probe misreads those classes")


def _row_seeds(inputs, dataset_rows, seed: int, control: int) -> list[int]:
    """One seed per batch row, from the study seed, the control number and the dataset rows of
    the row's images: an image's control tokens are then the same at any batch size, on any rank."""
    rows = [[int(dataset_rows[span.image_index]) for span in row] for row in inputs.layout.images]
    return [int(np.random.SeedSequence([seed, control, *images]).generate_state(1)[0]) for images in rows]


PAIRS_FROM_TRAIN = 256  # training images whose confusion chooses the pairs by default


def reference_confusion(model: HookedMLLM, sweep, reference: str, rows: np.ndarray, batch_size: int,
                        group: Any = None) -> np.ndarray:
    """[true, predicted] pixel counts of the sweep's probe at `reference` on dataset `rows`."""
    settings, probe = sweep.settings, sweep.probes[("model", reference)]
    scores = SegmentationScores(len(sweep.class_names), sweep.ignore_index)
    for _, batch in rank_batches(model, sweep.dataset, rows, batch_size=batch_size, group=group,
                                 prompt=settings.prompt, min_valid_fraction=settings.min_valid_fraction):
        labels = batch.labels["llm"]
        predicted = predict_image_tokens(model, batch.inputs, {reference: probe})[reference]
        scores.add(predicted, labels.labels, labels.valid, batch.masks, batch.inputs.layout.pixels("llm"))
    confusion = torch.from_numpy(scores.confusion.astype(np.float64))
    return distributed.all_reduce_sum(confusion, group).numpy()


def _default_window(model: HookedMLLM, reference: Site) -> list[int]:
    """LLM layers whose attention runs after the reference site has been computed."""
    n = model.cfg.n_layers
    if reference.stage != "llm":
        return list(range(n))
    return list(range(parse_hook_name(reference.hook).first_block_after(n), n))


def _readouts(model, sweep, reference: str, window: list[int], readouts) -> list[str]:
    probed = {hook for condition, hook in sweep.probes if condition == "model"}
    if readouts is None:
        names = [reference] + [f"blocks.{l}.hook_resid_post" for l in range(window[0], model.cfg.n_layers)]
        names = [n for n in names if n in probed]
    else:
        names = [model.resolve_hook_name(n) for n in readouts]
    missing = [n for n in names if n not in probed]
    if missing or reference not in probed:
        raise InputError(f"the sweep has no probe at {sorted(set(missing) | ({reference} - probed))}; "
                         f"rerun probe_sweep with those sites (probed: {sorted(probed)})")
    grids = {site_for(model, n).grid for n in names}
    if grids != {"llm"}:
        raise InputError("readout sites must be on the LLM token grid (adapter or LLM sites)")
    return list(dict.fromkeys(names))
