"""The layers and heads an intervention edits, as the caller listed them.

An intervention given an empty list of layers or heads builds no hook and changes nothing, which
reads like a result ("the knockout had no effect"); so a list the caller passes must name at least
one layer or head, each in range. `None` means every layer or head where an intervention allows it.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import InputError
from ..model.config import StageConfig


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


def attention_layers(layers: Iterable[int] | None, llm: StageConfig, edit: str) -> list[int]:
    """`chosen_indices` of the LLM's layers for `edit` ("a knockout", "head patching"), an edit of
    attention patterns or heads. A linear-attention layer (Qwen3.5's gated delta rule) has neither,
    so an edit that names one, or covers one by default (None: every layer), is refused naming the
    layers to pass instead, never applied to the attention layers alone behind the caller's back."""
    chosen = chosen_indices(layers, llm.n_layers, "layers", "the LLM")
    linear = sorted(set(chosen) & set(llm.linear_attention_layers))
    if linear:
        full = [layer for layer in range(llm.n_layers) if layer not in llm.linear_attention_layers]
        default = " (layers=None means every layer)" if layers is None else ""
        raise InputError(
            f"{edit} acts on attention patterns and heads, but LLM layers {linear}{default} are linear-attention "
            f"layers: a gated delta rule, with no attention pattern and no heads to knock out or patch. Pass "
            f"layers={full} (the full-attention layers), or edit a linear layer's own points "
            f"(blocks.{linear[0]}.linear_attn.hook_beta, hook_log_decay, hook_recurrence_out ...) with hooks or patching"
        )
    return chosen
