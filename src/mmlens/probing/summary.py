"""The sweep's headline numbers: where segmentation drops (adapter) and how much the LLM recovers.

Each statistic is computed on the point estimate and on every bootstrap resample of the test
images (the same resamples for all sites, so differences are paired); intervals are the 2.5 and
97.5 percentiles.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .metrics import miou_from_counts


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
    return pd.DataFrame(rows).set_index("statistic")
