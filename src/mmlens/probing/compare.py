"""Two sweeps compared on the same images: paired bootstrap intervals of their differences.

Whether two models (a causal and a bidirectional twin, two checkpoints, two prompts) differ is
read from the interval of their difference on the same test images, never from one interval
excluding zero and the other not. Both sweeps must have scored the same dataset rows; every
statistic of the summary is recomputed for both on each bootstrap resample of those images (the
same resample for both), and the difference's percentile interval is reported.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import InputError
from ..findings import effect_phrase, verdict
from ..resampling import DEFAULT_N_BOOT, bootstrap_indices, percentile_interval
from .summary import summary_samples

COMPARED = ("adapter_in_miou", "adapter_out_miou", "drop_at_adapter", "recovery_layer_miou", "recovery_in_llm")


def compare_sweeps(a, b, *, names: tuple[str, str] = ("a", "b"), condition: str = "model",
                   n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> pd.DataFrame:
    """One row per summary statistic: its value in `a` and `b`, the difference a - b with a paired
    95% bootstrap interval over the shared test images, and the difference's reading."""
    _check_same_images(a, b)
    resamples = bootstrap_indices(len(a.test_indices), n_boot, seed)
    samples = [summary_samples(s, condition, resamples=resamples) for s in (a, b)]
    rows = []
    for statistic in COMPARED:
        diff = samples[0][statistic] - samples[1][statistic]
        low, high = percentile_interval(diff[1:])
        rows.append({"statistic": statistic, names[0]: float(samples[0][statistic][0]),
                     names[1]: float(samples[1][statistic][0]), "difference": float(diff[0]), "low": low,
                     "high": high, "reading": verdict(low, high)})
    table = pd.DataFrame(rows).set_index("statistic")
    table.attrs.update(names=list(names), n_images=len(a.test_indices), n_boot=n_boot)
    return table


def comparison_findings(table: pd.DataFrame) -> list[str]:
    """The paired differences in sentences: a contrast is stated only from its own interval."""
    first, second = table.attrs.get("names", ["a", "b"])
    lines = []
    for statistic, words in (("drop_at_adapter", "drop at the adapter"), ("recovery_in_llm", "recovery in the LLM")):
        row = table.loc[statistic]
        phrase = effect_phrase(row.difference, row.low, row.high, signed=True)
        if row.reading == "above zero":
            claim = f"larger in {first} than in {second}"
        elif row.reading == "below zero":
            claim = f"smaller in {first} than in {second}"
        else:
            claim = f"{first} and {second} cannot be told apart"
        lines.append(f"The {words}, {first} minus {second} on the same {table.attrs['n_images']} images: "
                     f"{phrase} ({claim}).")
    return lines


def _check_same_images(a, b) -> None:
    if tuple(a.class_names) != tuple(b.class_names):
        raise InputError("the sweeps label different classes; compare sweeps of one dataset")
    if not np.array_equal(np.asarray(a.test_indices), np.asarray(b.test_indices)):
        raise InputError(
            f"the sweeps scored different test images ({len(a.test_indices)} and {len(b.test_indices)}, "
            f"{len(np.intersect1d(a.test_indices, b.test_indices))} shared): a paired comparison needs the same images. "
            "Run both with the same dataset, seed and test_fraction"
        )
    if a.dataset is not None and b.dataset is not None and len(a.dataset) != len(b.dataset):
        raise InputError(f"the sweeps come from datasets of {len(a.dataset)} and {len(b.dataset)} images; "
                         "load both with the same arguments")


__all__ = ["compare_sweeps", "comparison_findings"]
