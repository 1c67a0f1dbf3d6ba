"""The layers and heads an intervention edits, as the caller listed them.

An intervention given an empty list of layers or heads builds no hook and changes nothing, which
reads like a result ("the knockout had no effect"); so a list the caller passes must name at least
one layer or head, each in range. `None` means every layer or head where an intervention allows it.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import InputError


def chosen_indices(indices: Iterable[int] | None, count: int, what: str, where: str, hint: str = "") -> list[int]:
    """Sorted distinct `indices` (all `count` of them for None); an empty list or one out of
    0..count-1 is an `InputError` naming `what` ("layers", "heads") and `where` ("the llm stage"),
    followed by `hint`."""
    if indices is None:
        return list(range(count))
    if isinstance(indices, int):
        indices = [indices]
    chosen = sorted({int(i) for i in indices})
    if not chosen:
        raise InputError(f"{what}=[] selects no {what[:-1]} of {where}: the edit would build no hook and change "
                         f"nothing. Name at least one of 0..{count - 1}{hint}")
    bad = [i for i in chosen if not 0 <= i < count]
    if bad:
        raise InputError(f"{what} {bad} out of range: {where} has {what} 0..{count - 1}{hint}")
    return chosen
