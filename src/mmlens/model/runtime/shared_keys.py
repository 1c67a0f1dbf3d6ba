"""Keys and values one block stores for later blocks (KV sharing, Gemma 4 E2B / E4B) when rows join
a batch at different blocks.

A reusing block attends with the keys and values its storing block computed, so a row that joins a
growing batch after the storing block's attention has none there of its own. Such rows are copies
of one input that equal it up to where they join (patching's copies), so the keys and values they
would have stored are that input's: `recording_stored_keys` takes them from the input's own run, and
`joining_keys` hands them to the reusing blocks, which put them after the rows the storing block did
compute (`rows_with_joining_keys`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

# Hugging Face's keyword for the keys and values storing blocks leave for reusing ones, by layer type
SHARED_KV = "shared_kv_states"
# Set on each LLM block while rows join a growing batch after a storing block: their `JoiningKeys`
JOINING_KEYS = "_mmlens_joining_keys"

KeysAndValues = tuple[Float[Tensor, "batch kv_head seq d_head"], Float[Tensor, "batch kv_head seq d_head"]]


@dataclass(frozen=True)
class JoiningKeys:
    """What the rows joining after a storing block read: `stored`, one input's keys and values by
    layer type (Hugging Face's key), and `computed`, how many leading rows each storing block's
    attention computes in this run (the rest are copies of that input)."""

    stored: Mapping[str, KeysAndValues]
    computed: Mapping[int, int]


@contextmanager
def recording_stored_keys(layers: Sequence[nn.Module]) -> Iterator[dict[str, KeysAndValues]]:
    """Within the block, a run of the stack fills the yielded dict, on leaving, with the keys and
    values its storing blocks stored (those it reached when it stopped early), by layer type."""
    seen: list[Mapping[str, KeysAndValues]] = []

    def remember(_module: nn.Module, _args: tuple, kwargs: dict) -> None:
        stored = kwargs.get(SHARED_KV)
        if stored is not None and not any(stored is s for s in seen):
            seen.append(stored)

    recorded: dict[str, KeysAndValues] = {}
    handles = [layer.register_forward_pre_hook(remember, with_kwargs=True) for layer in layers]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
        for stored in seen:
            recorded.update(stored)


@contextmanager
def joining_keys(layers: Sequence[nn.Module], joining: JoiningKeys) -> Iterator[None]:
    """Within the block, the stack's reusing blocks give rows that joined after their storing block
    `joining.stored`, repeated."""
    for layer in layers:
        setattr(layer, JOINING_KEYS, joining)
    try:
        yield
    finally:
        for layer in layers:
            delattr(layer, JOINING_KEYS)


def rows_with_joining_keys(stored: KeysAndValues | None, joining: JoiningKeys, source: int, layer_type: str,
                           rows: int) -> KeysAndValues:
    """`stored` (the storing block `source`'s keys and values, None where it computed no row) for
    `rows` rows: those it computed, then `joining`'s for the rows that joined after it. Raises
    RuntimeError where the storing block computed other rows than the run planned: a row would
    otherwise read keys that are not its own."""
    computed = 0 if stored is None else stored[0].shape[0]
    given, planned = joining.stored.get(layer_type), joining.computed.get(source)
    if planned == computed == rows:
        return stored
    if planned != computed or given is None or computed > rows or (rows - computed) % given[0].shape[0]:
        raise RuntimeError(
            f"internal error (please report it): rows joined this batch after block {source}, whose keys and values "
            f"a later block reuses, but block {source} computed {computed} rows where {planned} were planned, of the "
            f"{rows} the later block computes, with {'no' if given is None else given[0].shape[0]} rows of keys "
            "for those that joined after it")
    filled = tuple(t.repeat((rows - computed) // t.shape[0], *([1] * (t.ndim - 1))) for t in given)
    if stored is None:
        return filled
    return tuple(torch.cat([own, more.to(own)]) for own, more in zip(stored, filled))
