"""Activation patching with images: copy activations of a source run into a target run.

A run is inputs (image pixels included) plus an optional edit (a knockout, say) applied in every
forward. Patching replaces, in the target run, the activation at a hook, at chosen positions and
heads, by the source run's, and measures a metric per image. Clean -> corrupted finds what
restores behaviour; corrupted -> clean finds what is necessary. Many patch conditions share one
forward: the target batch is repeated once per condition along the batch dimension and each
replica gets its own patch, which gives the same numbers as patching one condition at a time.
Where each replica joins that forward, to skip what it shares with the target, is planned in
`shared_forward`; this module says what a patch means.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from ..progress import progress_bar

from ..errors import InputError
from ..model import HookedMLLM, MultimodalInputs
from ..model.hook_names import PER_HEAD_SITES, block_hook, parse_hook_name
from ..model.images.layout import same_span
from .groups import GroupContext, TokenGroup
from .run import Run, as_run, run_and_collect
from .selection import attention_layers
from .shared_forward import SharedForward

# inputs (possibly repeated, see `repeat_inputs`) -> forward hooks: a list of (name, hook) or an
# object with a `hooks` list, such as `knockout(...)`
# (activations of the run by hook name, plus "logits"; the run's inputs) -> one value per batch row
Metric = Callable[[Mapping[str, Tensor], MultimodalInputs], Float[Tensor, "batch"]]
# Replicas per forward are capped by rows: on CPU the cost per row is lowest at 16-32 rows of the
# embedded model and doubles past 64, once activations outgrow the caches (benchmarks/patching.py).
ROWS_PER_FORWARD = 32


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


def metric_hooks(metric: Metric) -> list[str]:
    return list(getattr(metric, "hooks", ()))


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
        # `shared_forward`); every copy patched there has joined
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
    parsed = parse_hook_name(name)
    if patch.heads is not None and not parsed.per_head:
        raise ValueError(f"heads= needs a per-head hook ({', '.join(PER_HEAD_SITES)}); {name} has no head dimension "
                         "at position 2. To patch heads' attention patterns, patch their hook_z instead.")
    if parsed.query_by_key and patch.positions is not None:
        raise ValueError(f"{name} is [batch, head, query, key]; patch it whole or use hook_z per position")
    positions = patch.positions
    if positions is None:
        mask = torch.ones(activation.shape[:2], dtype=torch.bool)
    elif isinstance(positions, TokenGroup):
        mask = positions.resolve(inputs, context)
        if parsed.stage == "vision":
            raise ValueError(f"{name} is a vision-tower hook; token groups over LLM positions cannot select its "
                             "patches: give positions as a bool mask [n_images, vision_seq] or None")
        if parsed.stage == "adapter":
            mask = inputs.layout.scatter_adapter(mask, activation.shape[1])
    else:
        mask = torch.as_tensor(positions, dtype=torch.bool).cpu()
    if mask.shape != activation.shape[:2]:
        what = "[n_images, tokens]" if parsed.per_image else "[batch, seq]"
        raise ValueError(f"positions for {name} must be {what} = {tuple(activation.shape[:2])}, got {tuple(mask.shape)}")
    if parsed.per_head and activation.ndim == 4:  # always [batch, seq, heads], so patches combine
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
    wanted = [model.resolve_hook_name(n) for n in metric_hooks(metric)]
    schedule = SharedForward(model, source, target, [[p.hook for p in c] for c in conditions], wanted, chunk_size)
    if source_activations is None or not set(names) <= set(source_activations):
        source_activations = run_and_collect(model, source, [*names, *schedule.source_names])
    batch = len(target.inputs)
    stop = schedule.stop(getattr(metric, "reads_logits", True))
    values: list[Tensor | None] = [None] * len(conditions)
    bar = progress_bar(total=len(conditions), desc="patching", unit="condition", enabled=progress)
    for chunk in schedule.plan(source_activations):
        chunk_conditions = [[]] * chunk.lead + [conditions[i] for i in chunk.indices]
        patcher = _Patcher(model, target.inputs, source_activations, chunk_conditions, context)
        k, lead = chunk.copies, chunk.lead
        repeated = schedule.inputs(k)
        found = schedule.run(chunk, patcher.hooks, stop)
        per_copy = getattr(metric, "per_copy", None)
        if per_copy is not None and k > 1:  # one evaluation for every copy (a probe's matmul)
            every = per_copy(found, repeated, k)
            if not isinstance(every, Tensor) or every.shape != (k, batch):
                raise ValueError(f"a metric's per_copy must return [copies, batch] = ({k}, {batch}), got "
                                 f"{tuple(every.shape) if isinstance(every, Tensor) else type(every).__name__}")
            for r, condition in enumerate(chunk.indices, start=lead):
                values[condition] = every[r]
        else:
            n_images = target.inputs.layout.n_images
            for r, condition in enumerate(chunk.indices, start=lead):
                rows = {n: _replica(a, r, n_images if parse_hook_name(n).per_image else batch) for n, a in found.items()}
                values[condition] = evaluate(metric, rows, target.inputs)
        bar.update(len(chunk.indices))
    bar.close()
    return torch.stack(values)


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
    layers = attention_layers(layers, model.cfg.llm, "head patching")
    n_heads, cross = model.cfg.llm.n_heads, set(model.cfg.llm.cross_attention_layers)
    # a cross-attention block's heads read the images (Mllama): its `cross_attn` points
    site = lambda l: f"{'cross_attn' if l in cross else 'attn'}.hook_{hook}"  # noqa: E731
    return layers, [Patch(block_hook(l, site(l)), positions, (h,)) for l in layers for h in range(n_heads)]


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
