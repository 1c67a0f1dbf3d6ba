"""The sweep's headline numbers: where segmentation drops (adapter) and how much the LLM recovers.

Each statistic is computed on the point estimate and on every bootstrap resample of the test
images (the same resamples for all sites, so differences are paired); intervals are the 2.5 and
97.5 percentiles. `summary_findings` words them only as strongly as those intervals allow: a
drop or recovery whose interval includes zero is "not distinguishable from zero", and the
fraction recovered is withheld unless the drop itself is distinguishable from zero.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..findings import effect_phrase, excludes_zero, verdict
from .metrics import miou_from_counts

EFFECTS = ("drop_at_adapter", "recovery_in_llm")  # differences: their reading says whether they exceed zero


def sweep_summary(sweep, condition: str = "model") -> pd.DataFrame:
    table = sweep.table[sweep.table.condition == condition].set_index("hook")
    if "adapter.hook_in" not in table.index or "adapter.hook_out" not in table.index:
        raise ValueError("the summary needs the sites adapter.hook_in and adapter.hook_out in the sweep")
    llm = [s.hook for s in sweep.sites if s.stage == "llm"]
    if not llm:
        raise ValueError("the summary needs at least one LLM site in the sweep")
    counts = {hook: np.stack(sweep.scores[(condition, hook)].per_image) for hook in ["adapter.hook_in", "adapter.hook_out", *llm]}

    def stats(index: np.ndarray | None) -> dict[str, float]:
        def miou(hook):
            c = counts[hook] if index is None else counts[hook][index]
            return miou_from_counts(c.sum(0))

        adapter_in, adapter_out = miou("adapter.hook_in"), miou("adapter.hook_out")
        llm_scores = np.array([miou(h) for h in llm])
        peak = int(np.nanargmax(llm_scores)) if index is None else peak_index
        drop = adapter_in - adapter_out
        recovery = llm_scores[peak] - adapter_out
        return {
            "adapter_in_miou": adapter_in,
            "adapter_out_miou": adapter_out,
            "drop_at_adapter": drop,
            "peak_llm_miou": llm_scores[peak],
            "recovery_in_llm": recovery,
            "fraction_recovered": recovery / drop if drop > 0 else float("nan"),
            "peak_index": peak,
        }

    point = stats(None)
    peak_index = point["peak_index"]
    boots = [stats(idx) for idx in sweep.bootstrap]
    rows = []
    for key, value in point.items():
        if key == "peak_index":
            continue
        samples = np.array([b[key] for b in boots], dtype=float)
        rows.append({"statistic": key, "value": value,
                     "low": float(np.nanpercentile(samples, 2.5)), "high": float(np.nanpercentile(samples, 97.5))})
    peak_hook = llm[peak_index]
    rows.append({"statistic": "peak_llm_layer", "value": float(table.loc[peak_hook, "layer"]), "low": np.nan, "high": np.nan})
    summary = pd.DataFrame(rows).set_index("statistic")
    summary["reading"] = ""
    for effect in EFFECTS:
        summary.loc[effect, "reading"] = verdict(summary.loc[effect, "low"], summary.loc[effect, "high"])
    if not excludes_zero(summary.loc["drop_at_adapter", "low"], summary.loc["drop_at_adapter", "high"]):
        # a ratio over a drop that may be zero has no meaning (its interval runs off to infinity)
        summary.loc["fraction_recovered", ["value", "low", "high"]] = np.nan
        summary.loc["fraction_recovered", "reading"] = "withheld: the drop is not distinguishable from zero"
    return summary


def summary_findings(summary: pd.DataFrame) -> list[str]:
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
    peak = f"the best LLM layer, {int(value['peak_llm_layer'])}, reaches mIoU {value['peak_llm_miou']:.3f}"
    recovery_reading = verdict(low["recovery_in_llm"], high["recovery_in_llm"])
    if recovery_reading == "above zero":
        lines.append(f"The LLM recovers segmentation: {peak} (gain over the adapter output {recovery}).")
    else:
        lines.append(f"No recovery in the LLM can be claimed: {peak} (gain over the adapter output {recovery}).")
    fraction = summary.loc["fraction_recovered"]
    if np.isnan(fraction["value"]):
        lines.append("The fraction of the drop recovered is withheld: the drop is not distinguishable from zero.")
    else:
        lines.append(f"Fraction of the drop recovered: {fraction['value']:.2f} "
                     f"[{fraction['low']:.2f}, {fraction['high']:.2f}].")
    return lines
