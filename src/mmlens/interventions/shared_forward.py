"""Where each copy of the target joins the shared forward of a patching chunk: speed only.

Patching runs a chunk of conditions as one forward of the target repeated once per condition.
When everything patched and read is in the LLM, a copy equals the target up to the first point
it patches or reads, so it joins a growing batch there (`rows_joining`), at a block's input or
after its attention, instead of running the vision tower, the adapter and the lower layers
again. This changes no number: each copy computes what patching it alone would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..model import HookedMLLM, MultimodalInputs
from ..model.edits import edit_hooks
from ..model.hook_names import HookName, block_hook, parse_hook_name
from ..model.runtime.layer_runs import growing_batch
from ..model.runtime.shared_keys import JoiningKeys, KeysAndValues, joining_keys, recording_stored_keys
from .run import Run, run_and_collect, verify_edit


def rows_joining(model: HookedMLLM, active: Mapping[int, int], joining: Mapping[int, Tensor] | int, *,
                 attending: Mapping[int, int] | None = None,
                 joining_z: Mapping[int, Tensor] | int | None = None) -> AbstractContextManager[None]:
    """A context in which LLM block `l` computes only the first `active[l]` rows of a batch;
    the rows joining at `l` enter with `joining[l]` (a residual entering block `l`, repeated
    to fill them) or, for an int `n`, with copies of the first `n` rows as they enter block
    `l`. Copies of one input that differ only from some block on (patching one layer each)
    thus start where they differ, in one forward started at the lowest key
    (`start_at_layer`); hooks in block `l` see its `active[l]` rows. With `attending[l]`
    below `active[l]`, block `l`'s attention computes only that many rows (its q, k, v,
    scores and pattern hooks see them) and the others join at `attn.hook_z` with
    `joining_z[l]` (that block's z as it reaches `hook_z`, before that point's hooks,
    repeated) or copies of the first `joining_z` rows' z: copies that differ from a head's
    output on skip the attention that computes it."""
    layers = model.architecture.llm_layers(model.hf_model)
    return growing_batch(layers, active, joining, attending=attending, joining_z=joining_z)


@dataclass(frozen=True)
class Chunk:
    """Conditions that share one forward, in the order their copies sit in the batch: `joins[i]`
    is where condition `indices[i]` joins (`_join_point`), after `lead` unpatched target replicas."""

    indices: list[int]
    joins: list[int]
    lead: int

    @property
    def copies(self) -> int:
        return self.lead + len(self.indices)


class SharedForward:
    """The forwards of a patching sweep: which conditions share one, where each copy joins it,
    and the target's residuals (and z) the copies resume from, computed once per sweep.

    `patched[i]` are the hook names condition `i` patches and `read` those the metric reads;
    `chunks` (after `plan`) and `run` are all patching needs."""

    def __init__(self, model: HookedMLLM, source: Run, target: Run, patched: Sequence[Sequence[str]],
                 read: Sequence[str], chunk_size: int):
        self.model, self.target = model, target
        self.patched = [[model.resolve_hook_name(n) for n in hooks] for hooks in patched]
        self.read = [model.resolve_hook_name(n) for n in read]
        self.chunk_size = chunk_size
        self.copies = _TargetCopies(model, target)
        self.shared_input = _same_llm_input(model, source, self.copies)
        self.chunks: list[Chunk] = []
        self._residuals: list[Tensor] | None = None
        self._target_z: dict[int, Tensor] = {}
        self._target_keys: dict[str, KeysAndValues] = {}

    @property
    def source_names(self) -> list[str]:
        """What the schedule reads from the source run besides the patched activations."""
        return ["hook_multimodal_embed"] if self.shared_input else []

    def plan(self, source_activations: Mapping[str, Tensor]) -> list[Chunk]:
        """Split the conditions into chunks and, when the copies run only the LLM, order each by
        joining point and compute the target's residuals they resume from."""
        # Copies of the target differ only inside the LLM when every patched and read hook is there:
        # a copy that patches (and reads) nothing below layer l equals the target there, so it joins
        # the chunk's forward at block l (rows join a growing batch, `rows_joining`), or after block
        # l's attention when all it patches and reads in block l comes after hook_z (a head's
        # output), as a copy of an unpatched target replica that leads the chunk from its lowest
        # layer. Chunks stay consecutive conditions (head sweeps are layer-major), each sorted by
        # joining point, and start from the target's residual entering their lowest layer (and its
        # z there, when all of a chunk's copies join after that attention), computed once.
        n, size = len(self.patched), self.chunk_size
        groups = [list(range(first, min(first + size, n))) for first in range(0, n, size)]
        starts = [0] * n
        every = {name for hooks in self.patched for name in hooks} | set(self.read)
        if all(parse_hook_name(name).in_llm_layers for name in every):
            # a linear-attention block has no hook_z to join at: copies join it whole
            whole = (_blocks_edited_across_attention(self.model, self.copies.edit_names())
                     | set(self.model.cfg.llm.linear_attention_layers))
            starts = [_join_point(self.model, hooks, self.read, whole) for hooks in self.patched]
            groups = [sorted(group, key=starts.__getitem__) for group in groups]
            llm_input = source_activations.get("hook_multimodal_embed") if self.shared_input else None
            z_layers = {starts[g[0]] // 2 for g in groups if starts[g[0]] == starts[g[-1]] and starts[g[0]] % 2}
            up_to = max(starts[g[0]] // 2 for g in groups)
            # KV sharing: copies joining after a storing block's attention read the target's keys there
            storing = [s for s in set(_shared_key_layers(self.model).values()) if 2 * s < max(starts)]
            self._residuals, self._target_z, self._target_keys = _llm_residuals(
                self.model, self.copies, llm_input, up_to, z_layers, max(storing, default=-1) + 1)
        resumed = self._residuals is not None
        self.chunks = [Chunk(group, [starts[i] for i in group], int(resumed and starts[group[0]] < starts[group[-1]]))
                       for group in groups]
        return self.chunks

    def stop(self, reads_logits: bool) -> dict[str, int]:
        """A metric that reads no logits (a probe) needs no layer above the highest one it reads."""
        n_layers = self.model.cfg.n_layers
        last = max((_llm_layer(parse_hook_name(name), n_layers) for name in self.read), default=n_layers)
        return {} if reads_logits or last >= n_layers else {"stop_at_layer": last + 1}

    def inputs(self, copies: int) -> MultimodalInputs:
        """The target's inputs repeated `copies` times."""
        return self.copies.inputs(copies)

    def run(self, chunk: Chunk, patch_hooks: Sequence[tuple[str, Callable]], stop: Mapping[str, Any]) -> dict[str, Tensor]:
        """One forward of a chunk's copies under `patch_hooks`: the activations the metric reads."""
        k = chunk.copies
        if self._residuals is None:
            run = Run(self.copies.inputs(k), self.target.edit, self.target.name)
            return run_and_collect(self.model, run, self.read, extra_hooks=patch_hooks, **stop)
        joins = [chunk.joins[0] // 2 * 2] * chunk.lead + chunk.joins
        return _run_from_residuals(self.model, self.copies, self._residuals, self._target_z, joins, self.read,
                                   patch_hooks, stop, self._target_keys)


class _TargetCopies:
    """The target repeated k times (`repeat_inputs`) and its edit made for k copies, each made
    once per sweep: every chunk of k copies shares them. The copies run only the LLM, so they
    take the edit's hooks there: the rest (vision, adapter, `hook_multimodal_embed`) already
    shaped the LLM input they start from, and must not apply twice."""

    def __init__(self, model: HookedMLLM, target: Run):
        self.model, self.target = model, target
        self._inputs: dict[int, MultimodalInputs] = {1: target.inputs}
        self._edits: dict[int, tuple[list, Any]] = {}

    def inputs(self, k: int) -> MultimodalInputs:
        if k not in self._inputs:
            self._inputs[k] = self.target.inputs.repeat(k)
        return self._inputs[k]

    def _made(self, k: int) -> tuple[list, Any]:
        if k not in self._edits:
            self._edits[k] = edit_hooks(self.target.edit, self.inputs(k))
        return self._edits[k]

    def only_llm(self) -> bool:
        """Whether every hook of the edit is in the LLM (by name)."""
        return _only_llm_hooks(self.model, self._made(1)[0])

    def _llm_hooks(self, k: int) -> list[tuple[str, Callable]]:
        hooks = self._made(k)[0]
        if not all(isinstance(name, str) for name, _ in hooks):
            raise InputError("patching copies run only the LLM and apply the target's edit there by hook name: give "
                             "the edit's hooks as names, not name filters")
        return [(name, fn) for name, fn in hooks if _in_llm_layers(self.model, name)]

    def edit_names(self) -> list[str]:
        """The LLM hook points the edit acts on."""
        return [name for name, _ in self._llm_hooks(1)]

    def edit_hooks(self, counts: set[int]) -> list[tuple[str, Callable]]:
        """The LLM edit made for each number of copies in `counts`, each acting on activations of
        its rows only: a block computes only the copies that joined by then, and the attention of
        a block that copies join after it only those that joined before."""
        rows, hooks = len(self.target.inputs), []
        for k in sorted(counts):
            hooks += [(name, partial(_on_rows, k * rows, fn)) for name, fn in self._llm_hooks(k)]
        return hooks

    def verify(self) -> None:
        for _, made in self._edits.values():
            verify_edit(made)


def _on_rows(rows: int, fn: Callable, activation: Tensor, **kwargs: Any) -> Any:
    """`fn`, on activations of `rows` rows only."""
    return fn(activation, **kwargs) if activation.shape[0] == rows else None


def _run_from_residuals(model: HookedMLLM, copies: _TargetCopies, residuals: Sequence[Tensor],
                        target_z: Mapping[int, Tensor], joins: Sequence[int], wanted: Sequence[str],
                        patch_hooks: Sequence[tuple[str, Callable]], stop: Mapping[str, Any],
                        target_keys: Mapping[str, KeysAndValues]) -> dict[str, Tensor]:
    """One LLM-only forward of a chunk's copies, sorted by `joins`, the point each joins at
    (`_join_point`): it starts at the lowest block from the target's residual there, and each
    block computes the copies joined by then, those joining entering as copies of the first (an
    unpatched target replica whenever copies join at more than one point). Copies that join after
    a block's attention take the leading replica's z there as computed, or the target's as it
    reached `hook_z` when all join there, and, where a later block reuses that attention's keys
    and values, the target's (`target_keys`). The target's edit is made for as many copies as each
    of its hooks sees."""
    k, batch, first = len(joins), len(copies.target.inputs), joins[0] // 2
    layers = range(first, joins[-1] // 2 + 1)
    active = {l: batch * sum(j // 2 <= l for j in joins) for l in layers}
    attending = {l: batch * sum(j <= 2 * l for j in joins) for l in layers}
    attending = {l: n for l, n in attending.items() if n < active[l]}
    if not attending and all(n == k * batch for n in active.values()):
        active = {}
    edit = copies.edit_hooks({n // batch for n in [*active.values(), *attending.values(), k * batch] if n})
    resume = {"llm_inputs_embeds": residuals[first].repeat(k, 1, 1), "start_at_layer": first}
    joining_z = batch if joins[0] < joins[-1] else {first: target_z[first]} if joins[0] % 2 else None
    sharing = nullcontext()
    if target_keys:  # each storing block's attention computes the copies that join at or before it
        computed = {s: batch * sum(j <= 2 * s for j in joins) for s in set(_shared_key_layers(model).values())}
        sharing = joining_keys(model.architecture.llm_layers(model.hf_model), JoiningKeys(target_keys, computed))
    with rows_joining(model, active, batch, attending=attending, joining_z=joining_z), sharing:
        found = run_and_collect(model, Run(copies.inputs(k), None, copies.target.name), wanted,
                                extra_hooks=[*edit, *patch_hooks], **resume, **stop)
    copies.verify()
    return found


def _llm_residuals(model: HookedMLLM, copies: _TargetCopies, llm_input: Tensor | None, up_to: int,
                   z_layers: set[int], keys_up_to: int = 0
                   ) -> tuple[list[Tensor], dict[int, Tensor], dict[str, KeysAndValues]]:
    """The target run's residual entering LLM blocks 0..`up_to` (`up_to` = n_layers: leaving the
    last), and its z (`attn.hook_z`) in `z_layers`, each as it reaches its hook point, before the
    target's edit acts there; from `llm_input` (its `hook_multimodal_embed`, when known) only the
    LLM runs, under the edit's LLM hooks, and not at all when block 0's input is all that is
    asked for. With `keys_up_to`, it runs at least the blocks below it and also gives the keys and
    values its storing blocks there stored (KV sharing), as edited."""
    if llm_input is not None and up_to == 0 and not z_layers and not keys_up_to and not _adds_before_block_0(model):
        return [llm_input], {}, {}
    stop = max(up_to, max(z_layers, default=-1) + 1, keys_up_to)
    names = [block_hook(l, "hook_resid_pre") for l in range(stop)]
    z_names = {l: block_hook(l, "attn.hook_z") for l in sorted(z_layers)}
    # copies resume from these and the target's edit applies to them again: keep them unedited
    recording = recording_stored_keys(model.architecture.llm_layers(model.hf_model)) if keys_up_to else nullcontext({})
    with recording as keys:
        if llm_input is None:
            found = run_and_collect(model, copies.target, [*names, *z_names.values()], before_edit=True,
                                    stop_at_layer=stop)
        else:
            found = run_and_collect(model, Run(copies.target.inputs), [*names, *z_names.values()], before_edit=True,
                                    extra_hooks=copies.edit_hooks({1}), llm_inputs_embeds=llm_input, stop_at_layer=stop)
            copies.verify()
    residuals = [*(found[name] for name in names), found["residual"]]
    return residuals, {l: found[name] for l, name in z_names.items()}, keys


def _shared_key_layers(model: HookedMLLM) -> dict[int, int]:
    """The LLM blocks that attend with another block's keys and values, each to that block (KV sharing)."""
    kv_layer = model.architecture.key_value_layer
    return {l: kv_layer(model.cfg, l) for l in range(model.cfg.n_layers) if kv_layer(model.cfg, l) != l}


def _adds_before_block_0(model: HookedMLLM) -> bool:
    """Whether the LLM adds to its input embedding before block 0 (OPT's learned positions), so the
    residual entering block 0 is not `hook_multimodal_embed`."""
    return model.cfg.llm.positional_embedding_type == "learned"


def _same_llm_input(model: HookedMLLM, source: Run, copies: _TargetCopies) -> bool:
    """Whether the source run and the target feed the LLM the same input: same inputs, and no
    edit before the LLM (then the target's vision tower and adapter need not run again)."""
    a, b = source.inputs, copies.target.inputs
    same = a is b or (torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
                      and torch.equal(a.attention_mask, b.attention_mask) and a.extra.keys() == b.extra.keys()
                      and all(torch.equal(a.extra[k], b.extra[k]) for k in a.extra))
    return same and _only_llm_hooks(model, edit_hooks(source.edit, source.inputs)[0]) and copies.only_llm()


def _in_llm_layers(model: HookedMLLM, name: str) -> bool:
    return parse_hook_name(model.resolve_hook_name(name)).in_llm_layers


def _only_llm_hooks(model: HookedMLLM, hooks: Sequence[tuple[Any, Callable]]) -> bool:
    return all(isinstance(name, str) and _in_llm_layers(model, name) for name, _ in hooks)


def _llm_layer(name: HookName, n_layers: int) -> int:
    """The LLM block a hook sits in (n_layers for the final norm, and for points outside the blocks)."""
    return name.layer if name.in_llm_block else n_layers


def _join_point(model: HookedMLLM, patched: Sequence[str], wanted: Sequence[str], whole: set[int]) -> int:
    """Where a condition's copy first differs from the target: 2 l at the input of LLM block l,
    the lowest the condition patches or the metric reads, and 2 l + 1 after that block's attention
    when everything patched or read in it comes after `attn.hook_z` (the final norm: after the
    last block's) and the block is not in `whole`."""
    n_layers = model.cfg.n_layers
    names = [parse_hook_name(model.resolve_hook_name(n)) for n in [*patched, *wanted]]
    # the final norm counts as the end of the last block: rows join a growing batch at a block
    blocks = [min(_llm_layer(name, n_layers), n_layers - 1) for name in names]
    layer = min(blocks)
    after_z = all(name.layer is None or name.at_or_after_z for name, block in zip(names, blocks) if block == layer)
    return 2 * layer + int(after_z and layer not in whole)


def _blocks_edited_across_attention(model: HookedMLLM, edited: Sequence[str]) -> set[int]:
    """The LLM blocks where the target's edit hooks both inside the attention and elsewhere in
    the block. Copies join those blocks whole: an edit may carry state from its pattern hook to
    its z hook, say, and one made for a single number of copies must then serve both."""
    inside: dict[int, set[bool]] = {}
    for name in edited:
        parsed = parse_hook_name(model.resolve_hook_name(name))
        if parsed.in_llm_block:
            inside.setdefault(parsed.layer, set()).add(parsed.before_z_in_attention)
    return {layer for layer, kinds in inside.items() if len(kinds) == 2}
