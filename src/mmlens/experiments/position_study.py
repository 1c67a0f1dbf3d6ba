"""Position study: does causal attention starve the early image tokens?

Under causal attention an image token in raster order sees only the tokens before it, so the
top-left tokens can borrow little context. The study probes every LLM layer twice, once with
causal and once with bidirectional image attention (probes refitted under each), and also reads
the bidirectional run with the causal probes. Per-token accuracy is then tabulated by raster
position; the early-position deficit is the accuracy of the last tokens minus that of the first,
and, to cancel the class mix of each position, the same difference of the gain over the
adapter output (the LLM's input, where no token has seen another yet). Intervals are bootstrap
resamples of the held-out images, paired across conditions. Findings are worded by the sign the
interval allows: a negative deficit says the early tokens are the more accurate ones, a negative
gain that bidirectional attention lowers their accuracy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import distributed
from ..data.schema import segmentation_info
from ..errors import InputError
from ..findings import effect_phrase, verdict
from ..interventions import bidirectional_image_attention
from ..model.edits import edit_hooks
from ..model import HookedMLLM
from ..probing import ProbeSweep, probe_sweep
from ..probing.batches import pad_stack, rank_batches
from ..probing.predict import predict_image_tokens
from ..probing.sites import site_for
from ..display import result_html
from ..resampling import DEFAULT_N_BOOT, bootstrap_indices, check_n_boot
from .anchors import excluded_classes
from .intervals import percentile_interval, pooled_accuracy

CONDITIONS = ("causal", "bidirectional", "causal_probe_on_bidirectional")
BASELINE_SITE = "adapter.hook_out"


@dataclass
class PositionStudyResult:
    """Probe accuracy per image-token position, per condition and site, with early/late deficits and gains."""

    per_position: pd.DataFrame  # condition, hook, site, layer, position, row, col, correct, scored, accuracy
    summary: pd.DataFrame  # per condition and site: early / late accuracy, deficits with intervals
    gains: pd.DataFrame  # condition - causal on early and late tokens, with intervals
    grid: tuple[int, int]
    sweeps: dict[str, ProbeSweep] = field(repr=False)
    settings: dict[str, Any] = field(default_factory=dict)
    _hits: dict = field(repr=False, default_factory=dict)  # (condition, hook) -> [n_images, n_tokens] correct
    _scored: np.ndarray | None = field(repr=False, default=None)  # [n_images, n_tokens] labelled
    _resamples: np.ndarray | None = field(repr=False, default=None)

    def position_curves(self, site: str | None = None, by: str = "row") -> pd.DataFrame:
        """Accuracy per grid row (or raster position) at one site, per condition, with intervals."""
        sites = list(dict.fromkeys(self.per_position.site))
        site = site or sites[-1]
        hooks = dict(zip(self.per_position.site, self.per_position.hook))
        if site not in hooks:
            raise InputError(f"unknown site {site!r}; the study has {sites}")
        cols = self.grid[1]
        n_tokens = self._scored.shape[1]
        bins = np.arange(n_tokens) // cols if by == "row" else np.arange(n_tokens)
        rows = []
        for condition in CONDITIONS:
            hits = self._hits[(condition, hooks[site])]
            for b in np.unique(bins):
                correct, scored = hits[:, bins == b].sum(1), self._scored[:, bins == b].sum(1)
                low, high = percentile_interval([pooled_accuracy(correct, scored, i) for i in self._resamples])
                rows.append({"condition": condition, "site": site, "bin": int(b),
                             "accuracy": pooled_accuracy(correct, scored), "low": low, "high": high})
        return pd.DataFrame(rows)

    def figures(self) -> dict[str, Any]:
        from ..viz.intervention_plots import plot_position_curve, plot_position_heatmap

        return {"position_heatmap": plot_position_heatmap(self), "position_curve": plot_position_curve(self)}

    def findings(self) -> list[str]:
        """The headlines at the last site in sentences, each worded from its interval and by the
        sign it allows (the deficit is late minus early accuracy: below zero, the early tokens
        are the more accurate)."""
        last_site = self.summary.site.iloc[-1]
        rows = self.summary[self.summary.site == last_site].set_index("condition")
        gains = self.gains[(self.gains.site == last_site) & (self.gains.condition == "bidirectional")].set_index("tokens")
        columns = ["early_deficit", "early_deficit_low", "early_deficit_high"]
        deficit = {condition: _worded(*rows.loc[condition, columns],
                                      above="early tokens less accurate than late ones",
                                      below="early tokens more accurate than late ones: no early-token deficit")
                   for condition in ("causal", "bidirectional")}
        gain = _worded(*gains.loc["early", ["gain_over_causal", "low", "high"]],
                       above="bidirectional attention raises early-token accuracy",
                       below="bidirectional attention lowers early-token accuracy")
        return [
            f"early-token deficit (late minus early accuracy) at {last_site}: causal {deficit['causal']}; "
            f"bidirectional {deficit['bidirectional']}",
            f"bidirectional gain on early tokens {gain}",
        ]

    def _repr_html_(self) -> str:
        return result_html("PositionStudyResult", self.findings(), {"summary": self.summary, "gains": self.gains},
                           hint="result.figures() draws the grid heatmap and the raster-order curve.")


def position_study(
    model: HookedMLLM,
    dataset,
    *,
    layers: Iterable[int] | None = None,
    sites: Sequence[str] | None = None,
    probe: str = "ridge",
    early_fraction: float = 0.25,
    exclude: Iterable[int | str] | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    progress: bool = False,
    group: Any = None,
    **sweep_settings: Any,
) -> PositionStudyResult | None:
    """Per-token accuracy against raster position, causal vs bidirectional image attention.

    `layers`: LLM layers given bidirectional image attention in that condition (default all).
    `sites`: probed sites (default the adapter output and every LLM `hook_resid_post`); the
    adapter output is always included as the baseline. Tokens whose true class is in `exclude`
    (indices or names; default: classes named "background") are not scored, since a background
    token is right almost anywhere and would hide the effect. Other keywords go to `probe_sweep`
    (batch_size, test_fraction, ...). The model's own attention mode does not matter: the
    causal condition forces causal attention, so the bidirectional twin can be studied too.
    An `exclude` that leaves no class, or early or late positions that hold no scored token in
    any image, is refused (InputError) rather than reported as NaN.

    Under torch.distributed (torchrun, or `group`, a process group) both sweeps and the cross
    reading share the image batches over ranks (`probe_sweep`), per-image predictions go to rank 0
    in batch order, and rank 0 returns the result one process would; other ranks return None.
    """
    check_n_boot(n_boot)  # before the sweeps, not after them
    if not 0 < early_fraction <= 0.5:
        raise InputError(f"early_fraction must be in (0, 0.5], got {early_fraction}")
    exclude = None if exclude is None else list(exclude)  # read twice below: a generator would run dry
    _refuse_excluding_everything(dataset, exclude)
    layers = None if layers is None else sorted(set(layers))
    names = [BASELINE_SITE] + [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)] if sites is None else list(sites)
    names = list(dict.fromkeys([BASELINE_SITE, *(model.resolve_hook_name(n) for n in names)]))
    bad = [n for n in names if site_for(model, n).grid != "llm"]
    if bad:
        raise InputError(f"{bad} are vision sites; the position study reads image tokens on the LLM grid")

    def bidirectional(inputs):
        return bidirectional_image_attention(model, inputs, layers)

    common = dict(sites=names, probe=probe, seed=seed, n_boot=n_boot, progress=progress, group=group, **sweep_settings)
    with model.using_image_attention("causal"):
        sweeps = {"causal": probe_sweep(model, dataset, **common),
                  "bidirectional": probe_sweep(model, dataset, intervention=bidirectional, **common)}
        cross = _cross_predictions(model, dataset, sweeps["causal"], names, bidirectional, progress, group)
    if cross is None:  # a rank other than 0: the sweeps' held-out results and the cross reading are with rank 0
        return None
    cross, labels, valid = cross
    causal = sweeps["causal"]
    grid = causal.grids["llm"]
    excluded = torch.tensor(excluded_classes(causal.class_names, exclude), dtype=torch.long)
    counted = valid & ~torch.isin(labels, excluded)
    scored = counted.numpy()
    n_tokens = scored.shape[1]
    n_edge = max(1, int(round(early_fraction * n_tokens)))
    early, late = np.arange(n_tokens) < n_edge, np.arange(n_tokens) >= n_tokens - n_edge
    _refuse_unscored(scored, early, late, [causal.class_names[c] for c in excluded.tolist()])
    predictions = {("causal", n): causal.predictions[("model", n)] for n in names}
    predictions |= {("bidirectional", n): sweeps["bidirectional"].predictions[("model", n)] for n in names}
    predictions |= {("causal_probe_on_bidirectional", n): cross[n] for n in names}
    hits = {key: ((pred.long() == labels) & counted).numpy() for key, pred in predictions.items()}
    resamples = bootstrap_indices(len(scored), n_boot, seed)

    def accuracy(key, where, index=None):
        return pooled_accuracy(hits[key][:, where].sum(1), scored[:, where].sum(1), index)

    def deficit(key, index=None):
        return accuracy(key, late, index) - accuracy(key, early, index)

    def recovery_deficit(key, index=None):
        base = (key[0], BASELINE_SITE)
        return deficit(key, index) - deficit(base, index)

    rows, gains = [], []
    for name in names:
        site = site_for(model, name)
        for condition in CONDITIONS:
            key = (condition, name)
            row = {"condition": condition, "hook": name, "site": site.label, "layer": site.layer,
                   "early_accuracy": accuracy(key, early), "late_accuracy": accuracy(key, late),
                   "accuracy": accuracy(key, np.ones(n_tokens, dtype=bool))}
            for stat, fn in (("early_deficit", deficit), ("recovery_deficit", recovery_deficit)):
                row[stat] = fn(key)
                row[f"{stat}_low"], row[f"{stat}_high"] = percentile_interval([fn(key, i) for i in resamples])
            rows.append(row)
            if condition == "causal":
                continue
            base = ("causal", name)
            for part, where in (("early", early), ("late", late)):
                diff = [accuracy(key, where, i) - accuracy(base, where, i) for i in resamples]
                low, high = percentile_interval(diff)
                gains.append({"condition": condition, "hook": name, "site": site.label, "tokens": part,
                              "gain_over_causal": accuracy(key, where) - accuracy(base, where), "low": low, "high": high})
    # the heatmap's rows x cols; images with their own segments make one row of `layout.gather` rows
    shape = grid.raster(n_tokens)
    per_position = _per_position(hits, scored, names, model, shape[1])
    return PositionStudyResult(
        per_position=per_position, summary=pd.DataFrame(rows), gains=pd.DataFrame(gains), grid=shape,
        sweeps=sweeps,
        settings={"layers": layers, "early_fraction": early_fraction, "early_tokens": n_edge, "n_images": len(scored),
                  "probe": probe, "seed": seed, "n_boot": n_boot, "model_attention": model.image_attention,
                  "excluded_classes": [causal.class_names[c] for c in excluded.tolist()]},
        _hits=hits, _scored=scored, _resamples=resamples,
    )


def _worded(value: float, low: float, high: float, *, above: str, below: str) -> str:
    """The signed effect with its interval, then what its sign means when the interval allows one."""
    reading = {"above zero": above, "below zero": below}.get(verdict(low, high))
    text = effect_phrase(value, low, high, signed=True)
    return f"{text} ({reading})" if reading else text


def _refuse_excluding_everything(dataset, exclude) -> None:
    """Excluding every class leaves no token to score: refuse before the sweeps run."""
    names = list(segmentation_info(dataset).class_names)
    if len(excluded_classes(names, exclude)) >= len(names):
        raise InputError(f"exclude={exclude} excludes every class {names}: "
                         "no token would be scored; exclude fewer classes")


def _refuse_unscored(scored: np.ndarray, early: np.ndarray, late: np.ndarray, excluded: list[str]) -> None:
    """InputError naming the early or late tokens when no image has a scored one there: the deficit
    would be NaN, or rest on nothing."""
    for name, where in (("early tokens", early), ("late tokens", late)):
        if not scored[:, where].any():
            raise InputError(f"the {name} (raster positions {np.flatnonzero(where)[[0, -1]].tolist()}, classes "
                             f"other than {excluded}) hold no labelled token in any of the {len(scored)} held-out "
                             "images; raise early_fraction, exclude fewer classes or use other images")


def _cross_predictions(model, dataset, causal: ProbeSweep, names, intervention, progress=False, group=None):
    """The causal probes read on the bidirectional run of the same held-out images, with those
    images' LLM token labels and validity (padded to the longest image); each rank reads its
    batches and sends the per-image rows to rank 0 as each round finishes (None on other ranks)."""
    probes = {n: causal.probes[("model", n)] for n in names}
    settings = causal.settings
    to_main = distributed.ToMain(len(causal.test_indices), settings.batch_size, group)
    for number, batch in rank_batches(model, dataset, causal.test_indices, batch_size=settings.batch_size,
                                      group=group, prompt=settings.prompt, min_valid_fraction=settings.min_valid_fraction,
                                      progress=progress, desc="position study: causal probes on the bidirectional run"):
        predicted = predict_image_tokens(model, batch.inputs, probes, fwd_hooks=edit_hooks(intervention, batch.inputs)[0])
        to_main.add(number, (predicted, batch.labels["llm"].labels, batch.labels["llm"].valid))
    parts = to_main.finish().items  # rows of a batch's tensors below are its images
    if not distributed.is_main(group):
        return None
    out = {n: pad_stack([row for p in parts for row in p[0][n]], -1) for n in names}
    return (out, pad_stack([row for p in parts for row in p[1]], causal.ignore_index),
            pad_stack([row for p in parts for row in p[2]], False))


def _per_position(hits, scored, names, model, cols) -> pd.DataFrame:
    frames = []
    for (condition, name), hit in hits.items():
        site = site_for(model, name)
        correct, count = hit.sum(0), scored.sum(0)
        positions = np.arange(len(count))
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = np.where(count > 0, correct / np.maximum(count, 1), np.nan)
        frames.append(pd.DataFrame({"condition": condition, "hook": name, "site": site.label, "layer": site.layer,
                                    "position": positions, "row": positions // cols, "col": positions % cols,
                                    "correct": correct, "scored": count, "accuracy": accuracy}))
    order = {n: i for i, n in enumerate(names)}
    table = pd.concat(frames, ignore_index=True)
    return table.sort_values(["condition", "hook", "position"], key=lambda s: s.map(order) if s.name == "hook" else s,
                             kind="stable").reset_index(drop=True)
