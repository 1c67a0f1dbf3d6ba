"""The sweep's headline numbers: where segmentation drops (adapter) and how much the LLM recovers.

Nothing here is chosen on the test images: the recovery reads the LLM layer fixed in the
settings (default the last), and penalties were chosen by cross-validation on training images.
Each statistic is computed on the point estimate and on every bootstrap resample of the test
images (the same resamples for all sites and conditions, so differences are paired); intervals
are the 2.5 and 97.5 percentiles. Across LLM layers, simultaneous intervals come from the
bootstrap distribution of the largest standardised deviation over the layers (max-statistic), so
"some layer recovers" is claimed at a 5% family-wise error. `summary_findings` words everything
only as strongly as those intervals allow.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..errors import InputError
from ..findings import effect_phrase, verdict
from ..model.hook_names import parse_hook_name
from ..resampling import percentile_interval
from .metrics import miou_of_resamples

EFFECTS = ("drop_at_adapter", "recovery_in_llm")  # differences: their reading says whether they exceed zero
ADAPTER = ("adapter.hook_in", "adapter.hook_out")
SENSITIVITY_CONDITIONS = ("penalty/10", "penalty*10")


def recovery_site(sites: Sequence, recovery_layer: int | str = "last", *, required: bool = True):
    """The LLM site the recovery statistic reads: the deepest one ("last") or the residual stream
    after `recovery_layer`. None (or an error, when `required`) if the sweep probes no LLM site."""
    llm = [s for s in sites if s.stage == "llm"]
    if not llm:
        if required:
            raise ValueError("the summary needs at least one LLM site in the sweep")
        return None
    if recovery_layer == "last":
        return llm[-1]
    match = [s for s in llm if s.layer == recovery_layer and parse_hook_name(s.hook).site == "hook_resid_post"]
    if not match:
        raise InputError(f"recovery_layer={recovery_layer!r} is not among the sweep's LLM sites (layers "
                         f"{sorted({s.layer for s in llm})}); add blocks.{recovery_layer}.hook_resid_post to the sites "
                         "or use recovery_layer='last'")
    return match[0]


def _with_point(sweep, resamples: np.ndarray | None = None) -> np.ndarray:
    """Row 0 every test image once (the point estimate), then one row per bootstrap resample
    (default the sweep's own)."""
    resamples = sweep.bootstrap if resamples is None else resamples
    return np.vstack([np.arange(len(sweep.test_indices))[None], resamples])


def _counts(sweep, condition: str, hook: str) -> np.ndarray:
    return np.stack(sweep.scores[(condition, hook)].per_image)


def summary_samples(sweep, condition: str = "model", conditions: dict[str, str] | None = None,
                    resamples: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each headline statistic as [1 + n_boot] values: the point estimate, then one per bootstrap
    resample of the test images (`resamples`, default the sweep's own). `conditions` maps
    "in"/"out"/"llm" to the condition whose probes to read (default all `condition`): the
    sensitivity refits exist only at the summary's sites."""
    hooks = set(sweep.table.hook[sweep.table.condition == condition])
    if not set(ADAPTER) <= hooks:
        raise ValueError("the summary needs the sites adapter.hook_in and adapter.hook_out in the sweep")
    site = recovery_site(sweep.sites, sweep.settings.recovery_layer)
    which = {"in": condition, "out": condition, "llm": condition, **(conditions or {})}
    index = _with_point(sweep, resamples)
    values = {}
    for name, hook in (("in", ADAPTER[0]), ("out", ADAPTER[1]), ("llm", site.hook)):
        values[name] = miou_of_resamples(_counts(sweep, which[name], hook), index)
    drop, recovery = values["in"] - values["out"], values["llm"] - values["out"]
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(drop > 0, recovery / np.where(drop > 0, drop, 1.0), np.nan)
    return {"adapter_in_miou": values["in"], "adapter_out_miou": values["out"], "drop_at_adapter": drop,
            "recovery_layer_miou": values["llm"], "recovery_in_llm": recovery, "fraction_recovered": fraction}


def interval_row(name: str, samples: np.ndarray) -> dict:
    """{statistic, value, low, high} from [point, *resamples]."""
    low, high = percentile_interval(samples[1:])
    return {"statistic": name, "value": float(samples[0]), "low": low, "high": high}


def sweep_summary(sweep, condition: str = "model") -> pd.DataFrame:
    samples = summary_samples(sweep, condition)
    rows = [interval_row(name, values) for name, values in samples.items()]
    site = recovery_site(sweep.sites, sweep.settings.recovery_layer)
    rows.append({"statistic": "recovery_layer", "value": float(site.layer), "low": np.nan, "high": np.nan})
    edges = _penalties_at_grid_edge(sweep, condition, [*ADAPTER, site.hook])
    conditions = set(sweep.table.condition)
    if condition == "model":
        for variant in SENSITIVITY_CONDITIONS:
            if variant in conditions:
                varied = summary_samples(sweep, condition, {"in": variant, "out": variant, "llm": variant})
                rows += [interval_row(f"{effect} ({variant})", varied[effect]) for effect in EFFECTS]
        if "random_llm" in conditions:
            redrawn = summary_samples(sweep, "random_llm")
            rows.append(interval_row("recovery_over_random_llm", samples["recovery_in_llm"] - redrawn["recovery_in_llm"]))
    rows.append({"statistic": "penalties_at_grid_edge", "value": float(len(edges)), "low": np.nan, "high": np.nan})
    summary = pd.DataFrame(rows).set_index("statistic")
    summary["reading"] = ""
    summary.loc["penalties_at_grid_edge", "reading"] = "; ".join(edges)
    for name in summary.index:
        if name.startswith(EFFECTS) or name == "recovery_over_random_llm":
            summary.loc[name, "reading"] = verdict(summary.loc[name, "low"], summary.loc[name, "high"])
    if verdict(summary.loc["drop_at_adapter", "low"], summary.loc["drop_at_adapter", "high"]) != "above zero":
        # a ratio over a drop that may be zero has no meaning (its interval runs off to infinity)
        summary.loc["fraction_recovered", ["value", "low", "high"]] = np.nan
        summary.loc["fraction_recovered", "reading"] = "withheld: the drop is not above zero"
    return summary


def _penalties_at_grid_edge(sweep, condition: str, hooks: list[str]) -> list[str]:
    """"A-out (1e-05, the smallest candidate)" for each summary site whose cross-validated penalty
    is the grid's smallest or largest (the best may lie beyond the grid)."""
    penalties = getattr(sweep, "penalties", None)
    if penalties is None or not len(penalties):
        return []
    out = []
    for hook in hooks:
        rows = penalties[(penalties.condition == condition) & (penalties.hook == hook)]
        if len(rows) < 2 or rows.cv_loss.isna().any():
            continue
        chosen = float(rows.loc[rows.chosen, "candidate"].iloc[0])
        side = "smallest" if chosen == rows.candidate.min() else "largest" if chosen == rows.candidate.max() else None
        if side:
            out.append(f"{rows.site.iloc[0]} ({chosen:g}, the {side} candidate)")
    return out


def layer_recoveries(sweep, condition: str = "model", level: float = 0.95) -> pd.DataFrame:
    """Gain over the adapter output at every probed LLM site: value, pointwise interval, and a
    simultaneous interval (max-statistic bootstrap over the layers) for reading any layer of many."""
    llm = [s for s in sweep.sites if s.stage == "llm"]
    index = _with_point(sweep)
    adapter_out = miou_of_resamples(_counts(sweep, condition, ADAPTER[1]), index)
    gains = np.array([miou_of_resamples(_counts(sweep, condition, site.hook), index) - adapter_out
                      for site in llm]).reshape(len(llm), len(index))  # [layers, 1 + n_boot]
    point, boot = gains[:, 0], gains[:, 1:]
    spread = boot.std(axis=1)
    spread = np.where(spread > 0, spread, np.nan)
    deviations = np.abs(boot - point[:, None]) / spread[:, None]  # NaN for a layer whose gain never moves
    moving = ~np.all(np.isnan(deviations), axis=0)
    worst = np.nanmax(deviations[:, moving], axis=0) if moving.any() else np.array([])
    critical = float(np.percentile(worst, 100 * level)) if len(worst) else np.nan
    rows = []
    for k, site in enumerate(llm):
        low, high = percentile_interval(boot[k], level)
        rows.append({"hook": site.hook, "site": site.label, "layer": site.layer, "recovery": point[k],
                     "low": low, "high": high,
                     "simultaneous_low": point[k] - critical * spread[k],
                     "simultaneous_high": point[k] + critical * spread[k]})
    table = pd.DataFrame(rows)
    if len(table):
        table["reading"] = [verdict(lo, hi) for lo, hi in zip(table.simultaneous_low, table.simultaneous_high)]
    return table


def _verdicts(summary: pd.DataFrame, effect: str) -> dict[str, str]:
    out = {"chosen": verdict(summary.loc[effect, "low"], summary.loc[effect, "high"])}
    for variant in SENSITIVITY_CONDITIONS:
        name = f"{effect} ({variant})"
        if name in summary.index:
            out[variant] = verdict(summary.loc[name, "low"], summary.loc[name, "high"])
    return out


def summary_findings(summary: pd.DataFrame, layers: pd.DataFrame | None = None) -> list[str]:
    """One sentence per headline of `sweep_summary`'s table, each as strong as its interval allows."""
    value, low, high = summary["value"], summary["low"], summary["high"]
    drop = effect_phrase(value["drop_at_adapter"], low["drop_at_adapter"], high["drop_at_adapter"])
    recovery = effect_phrase(value["recovery_in_llm"], low["recovery_in_llm"], high["recovery_in_llm"])
    miou = f"mIoU {value['adapter_in_miou']:.3f} at the adapter input, {value['adapter_out_miou']:.3f} at its output"
    drop_reading = verdict(low["drop_at_adapter"], high["drop_at_adapter"])
    if drop_reading == "above zero":
        lines = [f"Segmentation drops at the adapter: {miou} (drop {drop})."]
    elif drop_reading == "below zero":
        lines = [f"Segmentation improves across the adapter, it does not drop: {miou} (drop {drop})."]
    else:
        lines = [f"No drop at the adapter can be claimed: {miou} (drop {drop})."]
    layer = f"LLM layer {int(value['recovery_layer'])} (fixed before looking at test images) reaches mIoU " \
            f"{value['recovery_layer_miou']:.3f}"
    recovery_reading = verdict(low["recovery_in_llm"], high["recovery_in_llm"])
    if recovery_reading == "above zero":
        lines.append(f"The LLM recovers segmentation: {layer} (gain over the adapter output {recovery}).")
    elif recovery_reading == "below zero":
        lines.append(f"The LLM loses segmentation, it does not recover it: {layer} (gain over the adapter output "
                     f"{recovery}).")
    else:
        lines.append(f"No recovery in the LLM can be claimed: {layer} (gain over the adapter output {recovery}).")
    fraction = summary.loc["fraction_recovered"]
    if np.isnan(fraction["value"]):
        lines.append("The fraction of the drop recovered is withheld: the drop is not above zero.")
    else:
        lines.append(f"Fraction of the drop recovered: {fraction['value']:.2f} "
                     f"[{fraction['low']:.2f}, {fraction['high']:.2f}].")
    if layers is not None and len(layers) > 1:
        above = [int(l) for l, r in zip(layers.layer, layers.reading) if r == "above zero"]
        below = [int(l) for l, r in zip(layers.layer, layers.reading) if r == "below zero"]
        text = (f"Across the {len(layers)} probed LLM layers (simultaneous 95% intervals), the gain over the adapter "
                f"output is above zero at {_layers(above)}")
        lines.append(text + (f" and below zero at {_layers(below)}." if below else "."))
    for effect, words in (("drop_at_adapter", "drop at the adapter"), ("recovery_in_llm", "recovery in the LLM")):
        readings = _verdicts(summary, effect)
        if len(readings) > 1:
            if len(set(readings.values())) == 1:
                lines.append(f"The {words} reads the same a decade either side of the chosen penalties "
                             f"({readings['chosen']}).")
            else:
                lines.append(f"The {words} depends on the probe penalty: " + "; ".join(
                    f"{'chosen penalties' if k == 'chosen' else k}: {v}" for k, v in readings.items()) + ".")
    if "penalties_at_grid_edge" in summary.index and value["penalties_at_grid_edge"] > 0:
        lines.append(f"The penalty chosen at {summary.loc['penalties_at_grid_edge', 'reading']} lies at the edge of "
                     "the candidate grid, where a better one may lie beyond it: widen alphas (or l2s) before resting "
                     "a conclusion on these numbers.")
    if "recovery_over_random_llm" in summary.index:
        gap = summary.loc["recovery_over_random_llm"]
        phrase = effect_phrase(gap["value"], gap["low"], gap["high"], signed=True)
        reading = verdict(gap["low"], gap["high"])
        if reading == "above zero":
            lines.append(f"The trained LLM's gain over the adapter output exceeds a re-drawn LLM's: {phrase}.")
        elif reading == "below zero":
            lines.append(f"A re-drawn LLM gains more over the adapter output than the trained one: {phrase}.")
        else:
            lines.append(f"The trained LLM's gain cannot be told apart from a re-drawn LLM's: {phrase}.")
    return lines


def _layers(layers: list[int]) -> str:
    if not layers:
        return "no layer"
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(str(l) for l in layers)


__all__ = ["interval_row", "layer_recoveries", "recovery_site", "summary_findings", "summary_samples", "sweep_summary"]
