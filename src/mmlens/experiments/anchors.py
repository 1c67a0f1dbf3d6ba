"""Conflicting class pairs and semantic anchors, read off a probe sweep.

Two classes conflict when the probe at a reference site mistakes one for the other often: the
pair's confusion rate is (C[a, b] + C[b, a]) / (pixels of a + pixels of b) from the sweep's
held-out pixel confusion matrix. Tokens of conflicting classes that the same probe classifies
correctly are the study's "semantic anchors"; the others of those classes are the tokens whose
recovery the anchors are supposed to steer.

Also here, because every study imports this module: the refusal of a token group that is empty
in every image (its statistics would be empty, and their intervals read as findings about nothing).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from ..errors import InputError
from ..interventions import TokenGroup

BACKGROUND_NAMES = ("background", "bg")


def conflicting_pairs(
    sweep,
    hook: str = "adapter.hook_out",
    n_pairs: int = 4,
    *,
    condition: str = "model",
    exclude: Iterable[int | str] | None = None,
    confusion: np.ndarray | None = None,
    where: str = "the held-out images",
) -> pd.DataFrame:
    """The `n_pairs` class pairs the probe at `hook` confuses most, most confused first.

    `exclude` (indices or names) defaults to classes called "background": confusing an object
    with the background is a boundary error, not a conflict between look-alike classes.
    `confusion`: the [true, predicted] pixel counts to read (default the sweep's, on its held-out
    images; `where` names the images they come from in errors).
    Columns: class_a, class_b, name_a, name_b, confusion_rate, pixels_a, pixels_b.
    """
    if n_pairs < 1:
        raise InputError(f"n_pairs must be at least 1, got {n_pairs}")
    key = (condition, hook)
    if key not in sweep.confusion:
        probed = sorted({h for c, h in sweep.confusion if c == condition})
        raise KeyError(f"the sweep has no {condition!r} probe at {hook!r}; probed sites: {probed}")
    names = list(sweep.class_names)
    excluded = set(excluded_classes(names, exclude))
    confusion = np.asarray(sweep.confusion[key] if confusion is None else confusion, dtype=float)
    support = confusion.sum(1)
    rows = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            if a in excluded or b in excluded or support[a] + support[b] == 0:
                continue
            rate = (confusion[a, b] + confusion[b, a]) / (support[a] + support[b])
            if rate > 0:
                rows.append({"class_a": a, "class_b": b, "name_a": names[a], "name_b": names[b],
                             "confusion_rate": rate, "pixels_a": int(support[a]), "pixels_b": int(support[b])})
    if not rows:
        raise InputError(f"the probe at {hook!r} confuses no pair of (non-excluded) classes on {where}; "
                         "pick another reference site or pass the pairs yourself")
    table = pd.DataFrame(rows).sort_values("confusion_rate", ascending=False, kind="stable")
    return table.head(n_pairs).reset_index(drop=True)


def excluded_classes(class_names, exclude: Iterable[int | str] | None = None) -> list[int]:
    """Class indices from `exclude` (indices or names); by default the classes named background."""
    names = list(class_names)
    if exclude is None:
        return [i for i, n in enumerate(names) if n.lower() in BACKGROUND_NAMES]
    out = []
    for e in exclude:
        if isinstance(e, str) and e not in names:
            raise InputError(f"unknown class {e!r} in exclude; classes: {names}")
        out.append(names.index(e) if isinstance(e, str) else int(e))
    return out


def pair_classes(pairs: pd.DataFrame) -> list[int]:
    """Every class that takes part in one of the pairs, in ascending order."""
    return sorted(set(pairs.class_a) | set(pairs.class_b))


def anchor_groups(sweep, hook: str, classes: Sequence[int], condition: str = "model") -> tuple[TokenGroup, TokenGroup]:
    """(anchors, non-anchors) among the tokens of `classes`: those the sweep's probe at `hook`
    classifies correctly, and those it gets wrong. Resolve them with a `GroupContext` holding
    the model and the token labels."""
    probe = sweep.probes[(condition, hook)]
    of_classes = TokenGroup.of_class(*classes)
    return TokenGroup.probe_correct(probe, hook) & of_classes, TokenGroup.probe_wrong(probe, hook) & of_classes


# ----------------------------------------------------------------- refusals shared by the studies
def refuse_empty(name: str, description: str, per_image: Sequence[int] | np.ndarray, what_to_do: str) -> None:
    """InputError when a token group has no token in any image of the study: every statistic of
    it would be empty or NaN, and its intervals would read as findings about nothing."""
    if int(np.asarray(per_image).sum()) == 0:
        raise InputError(f"the {name} ({description}) hold no token in any of the {len(per_image)} images of the "
                         f"study, so there is nothing to measure; {what_to_do}")

