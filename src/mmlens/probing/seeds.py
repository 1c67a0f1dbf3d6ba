"""Several seeds' sweeps combined into one estimate whose interval covers split and fit variation.

Each seed draws its own train/test split, cross-validation folds and control draws, so one seed's
bootstrap interval (images resampled within its split) misses how much the estimate moves from
one split and fit to the next. The combined estimate is the mean of the seeds' estimates; its
interval is the 2.5 and 97.5 percentiles of the seeds' bootstrap distributions pooled (an equal
mixture): each seed's distribution sits around its own estimate, so the spread between seeds
widens the interval beside the spread of images within each. A conclusion is stated only when
the combined interval supports it, and the seeds that disagree with it are named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import InputError
from ..findings import verdict, with_interval
from ..resampling import percentile_interval
from .summary import EFFECTS, summary_samples

COMBINED = ("adapter_in_miou", "adapter_out_miou", "drop_at_adapter", "recovery_layer_miou", "recovery_in_llm")


def samples_table(sweep, condition: str = "model") -> pd.DataFrame:
    """A sweep's summary statistics as columns, the point estimate in row 0 and one bootstrap
    resample per row after it: what a run folder keeps to combine seeds later."""
    samples = summary_samples(sweep, condition)
    return pd.DataFrame({name: samples[name] for name in COMBINED})


def combine_seeds(samples: Mapping[int, pd.DataFrame] | Sequence) -> pd.DataFrame:
    """One row per statistic: the mean of the seeds' estimates, the pooled-bootstrap interval, each
    seed's own estimate and the reading. `samples`: seed -> `samples_table(...)`, or sweeps."""
    if not isinstance(samples, Mapping):
        samples = {int(s.settings.seed): samples_table(s) for s in samples}
    if len(samples) < 2:
        raise InputError(f"combining seeds needs at least two, got {len(samples)}; run the study with seeds: [0, 1, ...]")
    sizes = {len(t) for t in samples.values()}
    if len(sizes) != 1:
        raise InputError(f"the seeds were run with different n_boot ({sorted(s - 1 for s in sizes)}); "
                         "combine seeds of one configuration")
    rows = []
    for statistic in COMBINED:
        per_seed = {seed: table[statistic].to_numpy(dtype=float) for seed, table in sorted(samples.items())}
        pooled = np.concatenate([values[1:] for values in per_seed.values()])
        low, high = percentile_interval(pooled)
        row = {"statistic": statistic, "value": float(np.mean([v[0] for v in per_seed.values()])), "low": low,
               "high": high, "reading": verdict(low, high) if statistic in EFFECTS else ""}
        row.update({f"seed {seed}": float(values[0]) for seed, values in per_seed.items()})
        rows.append(row)
    table = pd.DataFrame(rows).set_index("statistic")
    table.attrs["seeds"] = sorted(samples)
    return table


def combined_findings(table: pd.DataFrame) -> list[str]:
    """The combined drop and recovery in sentences, worded from the combined intervals."""
    seeds = table.attrs.get("seeds", [])
    lines = []
    for statistic, words in (("drop_at_adapter", "drop at the adapter"), ("recovery_in_llm", "recovery in the LLM")):
        row = table.loc[statistic]
        each = ", ".join(f"{row[f'seed {s}']:.3f}" for s in seeds)
        lines.append(f"Seeds {', '.join(map(str, seeds))} combined, the {words} is "
                     f"{with_interval(row.value, row.low, row.high)}, {row.reading} (seed by seed {each}; the "
                     "interval covers images, splits and fits).")
    return lines


__all__ = ["combine_seeds", "combined_findings", "samples_table"]
