"""Activation patching with images: copy activations of a source run into a target run.

A run is inputs (image pixels included) plus an optional edit (a knockout, say) applied in every
forward. Patching replaces, in the target run, the activation at a hook, at chosen positions and
heads, by the source run's, and measures a metric per image. Clean -> corrupted finds what
restores behaviour; corrupted -> clean finds what is necessary. Many patch conditions share one
forward: the target batch is repeated once per condition along the batch dimension and each
replica gets its own patch, which gives the same numbers as patching one condition at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError
from ..model import HookedMLLM, MultimodalInputs
from .groups import GroupContext, TokenGroup
from .selection import chosen_indices
from ..model.edits import Edit, edit_hooks
from ..model.layout import same_span

# inputs (possibly repeated, see `repeat_inputs`) -> forward hooks: a list of (name, hook) or an
# object with a `hooks` list, such as `knockout(...)`
# (activations of the run by hook name, plus "logits"; the run's inputs) -> one value per batch row
Metric = Callable[[Mapping[str, Tensor], MultimodalInputs], Float[Tensor, "batch"]]
# Replicas per forward are capped by rows: on CPU the cost per row is lowest at 16-32 rows of the
# embedded model and doubles past 64, once activations outgrow the caches (benchmarks/patching.py).
ROWS_PER_FORWARD = 32
# hooks of the LLM proper: patching and reading only these lets repeated copies skip vision and adapter
LLM_HOOK_PREFIXES = ("blocks.", "ln_final.")
HEAD_HOOKS = ("attn.hook_z", "attn.hook_result", "attn.hook_q", "attn.hook_k", "attn.hook_v",
              "attn.hook_rot_q", "attn.hook_rot_k")
# hooks of an LLM block that come after its attention's hook_z: a copy of the target that patches
# and reads nothing earlier in that block joins it there, skipping the attention
AFTER_Z = ("attn.hook_z", "attn.hook_result", "hook_attn_out", "ln1_post.", "hook_resid_mid", "ln2.", "mlp.",
           "hook_mlp_out", "ln2_post.", "hook_resid_post")
# hooks inside an attention before its hook_z: where copies join after that attention, these see
# fewer rows than the rest of the block (the target's edit is made for each number separately)
ATTENTION_INTERNALS = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_", "attn.hook_attn_scores",
                       "attn.hook_pattern", "attn.q_ln.", "attn.k_ln.")


@dataclass(frozen=True)
class Run:
    """One side of a patching experiment: inputs, and an edit applied in every forward of them.

    `edit(inputs)` must build its hooks for the inputs it is given: patching calls it on the
    inputs repeated once per condition (`repeat_inputs`), so masks must come from those inputs.
    """

    inputs: MultimodalInputs
    edit: Edit | None = None
    name: str = "run"


@dataclass(frozen=True)
class Patch:
    """Take `hook` from the source run at `positions` (a TokenGroup over sequence positions, a
    bool mask shaped like the activation's first two dims, or None for all) and `heads` (None for
    all; only for per-head hooks such as `attn.hook_z` and `attn.hook_result`)."""

    hook: str
    positions: TokenGroup | Tensor | None = None
    heads: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.heads, int):
            object.__setattr__(self, "heads", (self.heads,))
        elif self.heads is not None:
            object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
            if not self.heads:
                raise InputError(f"Patch({self.hook!r}, heads=()) patches no head and would change nothing; "
                                 "name at least one head, or heads=None for all")


Condition = Union[Patch, Sequence[Patch]]


def as_run(run: Run | MultimodalInputs, name: str = "run") -> Run:
    if isinstance(run, Run):
        return run
    if isinstance(run, MultimodalInputs):
        return Run(run, name=name)
    raise TypeError(f"expected a Run or MultimodalInputs (from model.prepare), got {type(run).__name__}")


def check_same_layout(source: MultimodalInputs, target: MultimodalInputs) -> None:
    """Raise a ValueError naming what differs when two batches do not share their layout."""
    a, b = source.layout, target.layout
    problems = []
    if source.input_ids.shape != target.input_ids.shape:
        problems.append(f"input_ids shapes {tuple(source.input_ids.shape)} vs {tuple(target.input_ids.shape)}")
    if source.pixel_values.shape != target.pixel_values.shape:
        problems.append(f"pixel_values shapes {tuple(source.pixel_values.shape)} vs {tuple(target.pixel_values.shape)}")
    if not problems and not torch.equal(source.attention_mask.cpu(), target.attention_mask.cpu()):
        rows = (source.attention_mask.cpu() != target.attention_mask.cpu()).any(1).nonzero().flatten().tolist()
        problems.append(f"padding (attention_mask) differs in rows {rows[:5]}")
    if not a.same_geometry(b):
        if [len(r) for r in a.images] != [len(r) for r in b.images]:
            problems.append(f"images per row {[len(r) for r in a.images]} vs {[len(r) for r in b.images]}")
        else:
            for ra, rb in zip(a.images, b.images):
                for sa, sb in zip(ra, rb):
                    if not same_span(sa, sb):
                        problems.append(f"row {sa.row}: image tokens at {int(sa.positions[0])}..{int(sa.positions[-1])} "
                                        f"({len(sa.positions)} in {len(sa.segments)} segment(s)) vs "
                                        f"{int(sb.positions[0])}..{int(sb.positions[-1])} ({len(sb.positions)} in "
                                        f"{len(sb.segments)})")
                        break
            if not problems:
                problems.append(f"sequence lengths {a.seq_len} vs {b.seq_len}")
    if problems:
        raise ValueError("source and target must share their layout to patch position by position, but "
                         + "; ".join(problems) + ". Use the same prompts (and padding) for both, and images the "
                         "processor maps to the same number of tokens.")


def repeat_inputs(inputs: MultimodalInputs, k: int) -> MultimodalInputs:
    """The batch repeated `k` times along the batch dimension, replica-major (rows r*B..r*B+B-1
    are replica r), with images and layout rows renumbered to match."""
    return inputs.repeat(k)


def verify_edit(made: Any) -> None:
    """A verified knockout must have left no attention on a blocked edge."""
    mass = getattr(made, "blocked_mass", None)
    if mass and max(mass.values()) != 0.0:
        raise RuntimeError(f"the edit left attention {max(mass.values())} on a blocked edge; it did not take effect")


def metric_hooks(metric: Metric) -> list[str]:
    return list(getattr(metric, "hooks", ()))


def run_and_collect(model: HookedMLLM, run: Run, names: Sequence[str], *, detach: bool = True,
                    extra_hooks: Sequence[tuple[str, Callable]] = (), before_edit: bool = False,
                    **forward_kwargs: Any) -> dict[str, Tensor]:
    """One forward of a run: the activations at `names` and the logits (with `stop_at_layer`,
    the residual entering that layer instead, as "residual"). With `before_edit`, each is kept as
    it reaches its hook point, before the run's edit changes it there (a copy, in case the edit
    writes in place): what a run resumed from it must be given, since the edit applies again."""
    hooks, made = edit_hooks(run.edit, run.inputs)
    store: dict[str, Tensor] = {}

    def keep(activation: Tensor, hook) -> None:
        activation = activation.detach() if detach else activation
        store[hook.name] = activation.clone() if before_edit else activation

    names = list(dict.fromkeys(model.resolve_hook_name(n) for n in names))
    kept = [(n, keep) for n in names]
    out = model.run_with_hooks(run.inputs, fwd_hooks=[*(kept if before_edit else []), *hooks, *extra_hooks,
                                                      *([] if before_edit else kept)], **forward_kwargs)
    verify_edit(made)
    # a run stopped at a layer returns the residual entering it, not logits
    store["logits" if forward_kwargs.get("stop_at_layer") is None else "residual"] = out
    return store


def evaluate(metric: Metric, activations: Mapping[str, Tensor], inputs: MultimodalInputs) -> Float[Tensor, "batch"]:
    value = metric(activations, inputs)
    if not isinstance(value, Tensor) or value.shape != (len(inputs),):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"a patching metric must return one value per batch row, shape ({len(inputs)},); got {shape}")
    return value


class _Patcher:
    """Masks of every condition of a chunk, resolved against the source activations' shapes."""

    def __init__(self, model: HookedMLLM, inputs: MultimodalInputs, source: Mapping[str, Tensor],
                 conditions: Sequence[Sequence[Patch]], context: GroupContext | None):
        self.source, self.k = source, len(conditions)
        self.masks: dict[str, Tensor] = {}
        for r, condition in enumerate(conditions):
            for patch in condition:
                name = model.resolve_hook_name(patch.hook)
                mask = patch_mask(model, inputs, name, source[name], patch, context)
                if name not in self.masks:
                    self.masks[name] = torch.zeros(self.k, *mask.shape, dtype=torch.bool, device=mask.device)
                self.masks[name][r] |= mask

    @property
    def hooks(self) -> list[tuple[str, Callable]]:
        return [(name, self._patch) for name in self.masks]

    def _patch(self, activation: Tensor, hook) -> Tensor:
        # a block that computes only the copies joined by then sees the first of them (see
        # `_run_from_residuals`); every copy patched there has joined
        src = self.source[hook.name]
        copies = activation.shape[0] // max(1, src.shape[0])
        if not 1 <= copies <= self.k or activation.shape[0] != copies * src.shape[0] or activation.shape[1:] != src.shape[1:]:
            raise RuntimeError(f"{hook.name}: the target activation {tuple(activation.shape)} does not match "
                               f"{self.k} copies of the source {tuple(src.shape)}")
        if self.masks[hook.name][copies:].any():
            raise RuntimeError(f"{hook.name}: a copy that patches here has not joined the batch yet")
        mask = self.masks[hook.name][:copies]
        mask = mask.view(*mask.shape, *([1] * (src.ndim + 1 - mask.ndim)))
        patched = torch.where(mask, src.unsqueeze(0), activation.view(copies, *src.shape))
        return patched.view_as(activation)


def patch_mask(model: HookedMLLM, inputs: MultimodalInputs, name: str, activation: Tensor, patch: Patch,
               context: GroupContext | None = None) -> Bool[Tensor, "..."]:
    """Where `patch` replaces `activation` (one run's activation at `name`): a bool mask over its
    leading dims ([batch, seq] or [batch, seq, heads]), broadcast over the rest."""
    stage_of_images = name.startswith(("vision.", "adapter."))
    if patch.heads is not None and not name.endswith(HEAD_HOOKS):
        raise ValueError(f"heads= needs a per-head hook ({', '.join(HEAD_HOOKS)}); {name} has no head dimension "
                         "at position 2. To patch heads' attention patterns, patch their hook_z instead.")
    if name.endswith(("hook_pattern", "hook_attn_scores")) and patch.positions is not None:
        raise ValueError(f"{name} is [batch, head, query, key]; patch it whole or use hook_z per position")
    positions = patch.positions
    if positions is None:
        mask = torch.ones(activation.shape[:2], dtype=torch.bool)
    elif isinstance(positions, TokenGroup):
        mask = positions.resolve(inputs, context)
        if name.startswith("vision."):
            raise ValueError(f"{name} is a vision-tower hook; token groups over LLM positions cannot select its "
                             "patches: give positions as a bool mask [n_images, vision_seq] or None")
        if name.startswith("adapter."):
            mask = inputs.layout.scatter_adapter(mask, activation.shape[1])
    else:
        mask = torch.as_tensor(positions, dtype=torch.bool).cpu()
    if mask.shape != activation.shape[:2]:
        what = "[n_images, tokens]" if stage_of_images else "[batch, seq]"
        raise ValueError(f"positions for {name} must be {what} = {tuple(activation.shape[:2])}, got {tuple(mask.shape)}")
    if name.endswith(HEAD_HOOKS) and activation.ndim == 4:  # always [batch, seq, heads], so patches combine
        n_heads = activation.shape[2]
        heads = range(n_heads) if patch.heads is None else patch.heads
        bad = [h for h in heads if not 0 <= h < n_heads]
        if bad:
            raise ValueError(f"heads {bad} out of range: {name} has heads 0..{n_heads - 1}")
        chosen = torch.zeros(n_heads, dtype=torch.bool)
        chosen[list(heads)] = True
        mask = mask[:, :, None] & chosen
    return mask.to(activation.device)


def _conditions(conditions: Sequence[Condition]) -> list[list[Patch]]:
    if isinstance(conditions, Patch) or not isinstance(conditions, Sequence) or len(conditions) == 0:
        raise InputError(f"conditions must be a non-empty list of Patches (or of lists of Patches applied together); "
                         f"got {conditions!r:.80}")
    out = []
    for c in conditions:
        group = [c] if isinstance(c, Patch) else list(c)
        if not group or not all(isinstance(p, Patch) for p in group):
            raise TypeError(f"each condition must be a Patch or a non-empty list of Patches, got {c!r}")
        out.append(group)
    return out


def _replica(activation: Tensor, r: int, rows: int) -> Tensor:
    return activation[r * rows:(r + 1) * rows]


@torch.no_grad()
def patch_conditions(
    model: HookedMLLM,
    source: Run | MultimodalInputs,
    target: Run | MultimodalInputs,
    metric: Metric,
    conditions: Sequence[Condition],
    *,
    chunk_size: int | None = None,
    context: GroupContext | None = None,
    source_activations: Mapping[str, Tensor] | None = None,
    progress: bool = False,
) -> Float[Tensor, "n_conditions batch"]:
    """The metric of the target run under each condition (a Patch, or Patches applied together),
    per batch row. `chunk_size` conditions share one forward of the target repeated that many
    times (default: as many as fit in `ROWS_PER_FORWARD` rows); results equal patching one
    condition at a time (up to batched-matmul rounding). `progress` shows a bar of conditions."""
    source, target = as_run(source, "source"), as_run(target, "target")
    check_same_layout(source.inputs, target.inputs)
    if chunk_size is None:
        chunk_size = max(1, ROWS_PER_FORWARD // len(target.inputs))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    conditions = _conditions(conditions)
    names = sorted({model.resolve_hook_name(p.hook) for c in conditions for p in c})
    copies = _TargetCopies(model, target)
    shared_input = _same_llm_input(model, source, copies)
    if source_activations is None or not set(names) <= set(source_activations):
        source_activations = run_and_collect(model, source, [*names, *(["hook_multimodal_embed"] if shared_input else [])])
    wanted = [model.resolve_hook_name(n) for n in metric_hooks(metric)]
    batch, n_images = len(target.inputs), target.inputs.layout.n_images
    # Copies of the target differ only inside the LLM when every patched and read hook is there:
    # a copy that patches (and reads) nothing below layer l equals the target there, so it joins
    # the chunk's forward at block l (rows join a growing batch, `HookedMLLM.llm_rows_joining`),
    # or after block l's attention when all it patches and reads in block l comes after hook_z
    # (a head's output), as a copy of an unpatched target replica that leads the chunk from its
    # lowest layer. Chunks stay consecutive conditions (head sweeps are layer-major), each sorted
    # by joining point, and start from the target's residual entering their lowest layer (and its
    # z there, when all of a chunk's copies join after that attention), computed once.
    chunks = [list(range(first, min(first + chunk_size, len(conditions))))
              for first in range(0, len(conditions), chunk_size)]
    residuals, target_z, starts = None, {}, [0] * len(conditions)
    if all(n.startswith(LLM_HOOK_PREFIXES) for n in [*names, *wanted]):
        whole = _blocks_edited_across_attention(model, copies.edit_names())
        starts = [_join_point(model, c, wanted, whole) for c in conditions]
        chunks = [sorted(chunk, key=starts.__getitem__) for chunk in chunks]
        llm_input = source_activations.get("hook_multimodal_embed") if shared_input else None
        z_layers = {starts[c[0]] // 2 for c in chunks if starts[c[0]] == starts[c[-1]] and starts[c[0]] % 2}
        residuals, target_z = _llm_residuals(model, copies, llm_input, max(starts[c[0]] // 2 for c in chunks), z_layers)
    # A metric that reads no logits (a probe) needs no layer above the highest one it reads.
    last = max((_hook_layer(model, n) for n in wanted), default=model.cfg.n_layers)
    stop = {} if getattr(metric, "reads_logits", True) or last >= model.cfg.n_layers else {"stop_at_layer": last + 1}
    values: list[Tensor | None] = [None] * len(conditions)
    bar = tqdm(total=len(conditions), desc="patching", unit="condition", disable=not progress, leave=False)
    for chunk in chunks:
        joins = [starts[i] for i in chunk]
        lead = int(residuals is not None and joins[0] < joins[-1])  # the unpatched target replica
        chunk_conditions = [[]] * lead + [conditions[i] for i in chunk]
        patcher = _Patcher(model, target.inputs, source_activations, chunk_conditions, context)
        k = len(chunk_conditions)
        repeated = copies.inputs(k)
        if residuals is None:
            found = run_and_collect(model, Run(repeated, target.edit, target.name), wanted, extra_hooks=patcher.hooks, **stop)
        else:
            found = _run_from_residuals(model, copies, residuals, target_z, [joins[0] // 2 * 2] * lead + joins, wanted,
                                        patcher.hooks, stop)
        per_copy = getattr(metric, "per_copy", None)
        if per_copy is not None and k > 1:  # one evaluation for every copy (a probe's matmul)
            every = per_copy(found, repeated, k)
            if not isinstance(every, Tensor) or every.shape != (k, batch):
                raise ValueError(f"a metric's per_copy must return [copies, batch] = ({k}, {batch}), got "
                                 f"{tuple(every.shape) if isinstance(every, Tensor) else type(every).__name__}")
            for r, condition in enumerate(chunk, start=lead):
                values[condition] = every[r]
        else:
            for r, condition in enumerate(chunk, start=lead):
                rows = {n: _replica(a, r, n_images if n.startswith(("vision.", "adapter.")) else batch) for n, a in found.items()}
                values[condition] = evaluate(metric, rows, target.inputs)
        bar.update(len(chunk))
    bar.close()
    return torch.stack(values)


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
            self._inputs[k] = repeat_inputs(self.target.inputs, k)
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
        return [(name, fn) for name, fn in hooks if self.model.resolve_hook_name(name).startswith(LLM_HOOK_PREFIXES)]

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
                        patch_hooks: Sequence[tuple[str, Callable]], stop: Mapping[str, Any]) -> dict[str, Tensor]:
    """One LLM-only forward of a chunk's copies, sorted by `joins`, the point each joins at
    (`_join_point`): it starts at the lowest block from the target's residual there, and each
    block computes the copies joined by then, those joining entering as copies of the first (an
    unpatched target replica whenever copies join at more than one point). Copies that join after
    a block's attention take the leading replica's z there as computed, or the target's as it
    reached `hook_z` when all join there. The target's edit is made for as many copies as each of
    its hooks sees."""
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
    with model.llm_rows_joining(active, batch, attending=attending, joining_z=joining_z):
        found = run_and_collect(model, Run(copies.inputs(k), None, copies.target.name), wanted,
                                extra_hooks=[*edit, *patch_hooks], **resume, **stop)
    copies.verify()
    return found


def _llm_residuals(model: HookedMLLM, copies: _TargetCopies, llm_input: Tensor | None, up_to: int,
                   z_layers: set[int]) -> tuple[list[Tensor], dict[int, Tensor]]:
    """The target run's residual entering LLM blocks 0..`up_to` (`up_to` = n_layers: leaving the
    last), and its z (`attn.hook_z`) in `z_layers`, each as it reaches its hook point, before the
    target's edit acts there; from `llm_input` (its `hook_multimodal_embed`, when known) only the
    LLM runs, under the edit's LLM hooks, and not at all when block 0's input is all that is
    asked for."""
    if llm_input is not None and up_to == 0 and not z_layers:
        return [llm_input], {}
    stop = max(up_to, max(z_layers, default=-1) + 1)
    names = [f"blocks.{l}.hook_resid_pre" for l in range(stop)]
    z_names = {l: f"blocks.{l}.attn.hook_z" for l in sorted(z_layers)}
    # copies resume from these and the target's edit applies to them again: keep them unedited
    if llm_input is None:
        found = run_and_collect(model, copies.target, [*names, *z_names.values()], before_edit=True, stop_at_layer=stop)
    else:
        found = run_and_collect(model, Run(copies.target.inputs), [*names, *z_names.values()], before_edit=True,
                                extra_hooks=copies.edit_hooks({1}), llm_inputs_embeds=llm_input, stop_at_layer=stop)
        copies.verify()
    return [*(found[name] for name in names), found["residual"]], {l: found[name] for l, name in z_names.items()}


def _same_llm_input(model: HookedMLLM, source: Run, copies: _TargetCopies) -> bool:
    """Whether the source run and the target feed the LLM the same input: same inputs, and no
    edit before the LLM (then the target's vision tower and adapter need not run again)."""
    a, b = source.inputs, copies.target.inputs
    same = a is b or (torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
                      and torch.equal(a.attention_mask, b.attention_mask) and a.extra.keys() == b.extra.keys()
                      and all(torch.equal(a.extra[k], b.extra[k]) for k in a.extra))
    return same and _only_llm_hooks(model, edit_hooks(source.edit, source.inputs)[0]) and copies.only_llm()


def _only_llm_hooks(model: HookedMLLM, hooks: Sequence[tuple[Any, Callable]]) -> bool:
    return all(isinstance(name, str) and model.resolve_hook_name(name).startswith(LLM_HOOK_PREFIXES) for name, _ in hooks)


def _hook_layer(model: HookedMLLM, name: str) -> int:
    """The LLM block a hook sits in (n_layers for the final norm)."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else model.cfg.n_layers


def _join_point(model: HookedMLLM, condition: Sequence[Patch], wanted: Sequence[str], whole: set[int]) -> int:
    """Where a condition's copy first differs from the target: 2 l at the input of LLM block l,
    the lowest the condition patches or the metric reads, and 2 l + 1 after that block's attention
    when everything patched or read in it comes after `attn.hook_z` (the final norm: after the
    last block's) and the block is not in `whole`."""
    names = [model.resolve_hook_name(n) for n in [*(p.hook for p in condition), *wanted]]
    # the final norm counts as the end of the last block: rows join a growing batch at a block
    blocks = {n: min(_hook_layer(model, n), model.cfg.n_layers - 1) for n in names}
    layer = min(blocks.values())
    after_z = all(not n.startswith("blocks.") or n.split(".", 2)[2].startswith(AFTER_Z)
                  for n in names if blocks[n] == layer)
    return 2 * layer + int(after_z and layer not in whole)


def _blocks_edited_across_attention(model: HookedMLLM, edited: Sequence[str]) -> set[int]:
    """The LLM blocks where the target's edit hooks both inside the attention and elsewhere in
    the block. Copies join those blocks whole: an edit may carry state from its pattern hook to
    its z hook, say, and one made for a single number of copies must then serve both."""
    inside: dict[int, set[bool]] = {}
    for name in edited:
        name = model.resolve_hook_name(name)
        if name.startswith("blocks."):
            inside.setdefault(_hook_layer(model, name), set()).add(name.split(".", 2)[2].startswith(ATTENTION_INTERNALS))
    return {layer for layer, kinds in inside.items() if len(kinds) == 2}


@torch.no_grad()
def baseline(model: HookedMLLM, run: Run | MultimodalInputs, metric: Metric) -> Float[Tensor, "batch"]:
    """The metric of an unpatched run, per batch row."""
    run = as_run(run)
    return evaluate(metric, run_and_collect(model, run, metric_hooks(metric)), run.inputs)


def head_conditions(model: HookedMLLM, hook: str = "z", layers: Sequence[int] | None = None,
                    positions: TokenGroup | Tensor | None = None) -> tuple[list[int], list[Patch]]:
    """One Patch per (layer, head) of the LLM at `attn.hook_{hook}`, layer-major."""
    if hook not in ("z", "result"):
        raise ValueError(f"head patching reads hook_z or hook_result: hook must be 'z' or 'result', got {hook!r}")
    if hook == "result" and not model.cfg.use_attn_result:
        raise ValueError("hook='result' needs model.set_use_attn_result(True)")
    layers = chosen_indices(layers, model.cfg.n_layers, "layers", "the LLM")
    n_heads = model.cfg.llm.n_heads
    return layers, [Patch(f"blocks.{l}.attn.hook_{hook}", positions, (h,)) for l in layers for h in range(n_heads)]


def head_sweep(
    model: HookedMLLM,
    source: Run | MultimodalInputs,
    target: Run | MultimodalInputs,
    metric: Metric,
    *,
    hook: str = "z",
    layers: Sequence[int] | None = None,
    positions: TokenGroup | Tensor | None = None,
    chunk_size: int | None = None,
    context: GroupContext | None = None,
) -> Float[Tensor, "layer head batch"]:
    """Patch each LLM head's output (`attn.hook_z` or `attn.hook_result`) at `positions` (default
    all) from source into target, one head at a time; the metric per layer, head and row."""
    layers, conditions = head_conditions(model, hook, layers, positions)
    values = patch_conditions(model, source, target, metric, conditions, chunk_size=chunk_size, context=context)
    return values.view(len(layers), model.cfg.llm.n_heads, -1)


def layer_position_sweep(
    model: HookedMLLM,
    source: Run | MultimodalInputs,
    target: Run | MultimodalInputs,
    metric: Metric,
    groups: Mapping[str, TokenGroup] | None = None,
    *,
    hook: str = "blocks.{layer}.hook_resid_pre",
    layers: Sequence[int] | None = None,
    chunk_size: int | None = None,
    context: GroupContext | None = None,
) -> Float[Tensor, "layer group batch"]:
    """Patch `hook` (a name with `{layer}`) at each token group in each LLM layer; the metric per
    layer, group and row. `groups` default: image, text and last tokens."""
    if "{layer}" not in hook:
        raise ValueError(f"hook must contain '{{layer}}' (e.g. 'blocks.{{layer}}.hook_resid_pre'), got {hook!r}")
    groups = dict(groups or {"image": TokenGroup.image(), "text": TokenGroup.text(), "last": TokenGroup.last()})
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    conditions = [Patch(hook.format(layer=l), g) for l in layers for g in groups.values()]
    values = patch_conditions(model, source, target, metric, conditions, chunk_size=chunk_size, context=context)
    return values.view(len(layers), len(groups), -1)
