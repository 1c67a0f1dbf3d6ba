"""Running part of a transformer stack: stop before block l, or start at block l from a residual.

TransformerLens's `stop_at_layer=l` returns the residual entering block `l` (`n_layers`: after
the last block, before the final norm); `start_at_layer=l` takes that residual and runs the
rest. Here the Hugging Face model runs as usual: a hook on block `l` raises with its input to
stop, and blocks below `l` pass their input through unchanged to start (block `l` is handed the
residual), so masks, positions and rotary embeddings are built by HF's own code. A growing batch
lets rows start at different blocks in one run: block `l` computes only the rows that have joined
by then, and the rows joining at `l` enter with a given residual; rows may also join a block
after its attention, at `hook_z`, with a given z, so that they skip that attention.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager

import torch
from torch import Tensor, nn

from ...errors import InputError

# Set on each attention mmlens instruments (None when idle): while a growing batch has rows join a
# block at hook_z, (the rows the attention computes, a function giving z for every row from theirs)
Z_JOIN = "_mmlens_z_join"
# Set by a family on a block that must return more than its input when a run skips it (a T5 block: its
# input and the relative position bias the blocks after it read): the forward a skipped block runs
SKIPPED_BLOCK = "_mmlens_skipped_block"


class StoppedAtLayer(Exception):
    """Carries the residual entering the block a run was asked to stop at."""

    def __init__(self, residual: Tensor):
        super().__init__("stopped at layer")
        self.residual = residual


def check_layer(layer: int | None, n_layers: int, what: str) -> int | None:
    """A layer index in [0, n_layers] (negative counts from the end, as in TL), or None."""
    if layer is None:
        return None
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise InputError(f"{what} must be an int, got {type(layer).__name__}")
    resolved = layer + n_layers if layer < 0 else layer
    if not 0 <= resolved <= n_layers:
        raise InputError(f"{what}={layer} is outside this stack's {n_layers} layers (use -{n_layers}..{n_layers})")
    return resolved


@contextmanager
def _raising(module: nn.Module, before: bool) -> Iterator[None]:
    """`module` raises `StoppedAtLayer` with its input (`before`) or its output."""

    def raise_input(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise StoppedAtLayer(args[0] if args else kwargs["hidden_states"])

    def raise_output(_module: nn.Module, _args: tuple, output: Any) -> None:
        raise StoppedAtLayer(output[0] if isinstance(output, tuple) else output)

    if before:
        handle = module.register_forward_pre_hook(raise_input, with_kwargs=True)
    else:
        handle = module.register_forward_hook(raise_output)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _replacing_input(module: nn.Module, residual: Tensor) -> Iterator[None]:
    """`module` receives `residual` instead of what the blocks below it passed on."""

    def replace(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (residual, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": residual}

    handle = module.register_forward_pre_hook(replace, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _passing_through(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Blocks that return their input: the instance `forward` (ours or none) is put back after."""
    saved = [layer.__dict__.get("forward") for layer in layers]
    try:
        for layer in layers:
            layer.forward = getattr(layer, SKIPPED_BLOCK, None) or (lambda hidden_states, *args, **kwargs: hidden_states)
        yield
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


@contextmanager
def silenced(*points: nn.Module) -> Iterator[None]:
    """Hook points that must not fire (the embedding points when a run starts mid-stack)."""
    saved = [(p._forward_hooks, p._backward_hooks) for p in points]
    try:
        for p in points:
            p._forward_hooks, p._backward_hooks = OrderedDict(), OrderedDict()
        yield
    finally:
        for p, (fwd, bwd) in zip(points, saved):
            p._forward_hooks, p._backward_hooks = fwd, bwd


@contextmanager
def layer_range(
    layers: Sequence[nn.Module], start: int | None, stop: int | None, residual: Tensor | None = None
) -> Iterator[None]:
    """Within the block, a run of the stack skips blocks below `start` (block `start` takes
    `residual` when given) and raises `StoppedAtLayer` with the residual entering block `stop`
    (`len(layers)`: leaving the last block)."""
    if start is not None and stop is not None and stop < start:
        raise InputError(f"stop_at_layer={stop} comes before start_at_layer={start}")
    stopping: ContextManager = nullcontext()
    if stop is not None:
        stopping = _raising(layers[stop], before=True) if stop < len(layers) else _raising(layers[-1], before=False)
    feeding: ContextManager = nullcontext()
    if residual is not None and start is not None and start < len(layers):
        feeding = _replacing_input(layers[start], residual)
    with _passing_through(layers[: start or 0]), feeding, stopping:
        yield


def run_or_stop(run: Any) -> tuple[Any, Tensor | None]:
    """(output, None) when `run()` finishes, (None, residual) when it stopped at a layer."""
    try:
        return run(), None
    except StoppedAtLayer as stopped:
        return None, stopped.residual


def first_rows(value: Any, rows: int, n: int) -> Any:
    """`value` (a block argument) cut to its first `n` batch rows: tensors whose leading dim is
    the batch; size-1 leading dims broadcast and stay. A tensor batched along another dim cannot
    be cut safely, so it stops the run instead of giving rows the wrong masks or positions."""
    if isinstance(value, Tensor) and value.ndim >= 2:
        if value.shape[0] == rows:
            return value[:n]
        if value.shape[0] != 1 and value.shape[1] == rows:
            raise RuntimeError(f"a block argument of shape {tuple(value.shape)} is batched along a dim other than "
                               "the first; rows cannot join this stack at different layers")
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(first_rows(v, rows, n) for v in value)
    return value


def _attention_of(layer: nn.Module) -> nn.Module:
    found = [m for m in layer.modules() if hasattr(m, Z_JOIN)]  # T5 keeps it a level down (`layer.0.SelfAttention`)
    if len(found) != 1:
        raise InputError(f"rows can join a {type(layer).__name__} at hook_z only when mmlens instruments its attention")
    return found[0]


def _filled(join: Tensor, count: int, what: str, like: Tensor) -> Tensor:
    """`join` repeated to fill `count` rows."""
    if count % len(join):
        raise InputError(f"{count} rows join {what}, not a multiple of the {len(join)} given")
    return join.repeat(count // len(join), *([1] * (join.ndim - 1))).to(like)


@contextmanager
def growing_batch(layers: Sequence[nn.Module], active: Mapping[int, int], joining: Mapping[int, Tensor] | int,
                  *, attending: Mapping[int, int] | None = None,
                  joining_z: Mapping[int, Tensor] | int | None = None) -> Iterator[None]:
    """Within the block, block `l` (each key of `active`) computes only the first `active[l]`
    rows of the batch; the rows that join at `l` (past those the block below computed) enter with
    `joining[l]` repeated to fill them, or, when `joining` is an int `n`, with copies of the first
    `n` rows' residual entering block `l` (a template computed in the same run). Rows past
    `active[l]` pass through untouched, so the stack's own code between blocks still sees the
    whole batch; `active` must not decrease, and must cover the whole batch from its first
    block on where a stop or the final norm reads it.

    With `attending[l]` < `active[l]`, block `l`'s attention computes only its first
    `attending[l]` rows (at least those the block below computed), and its own hooks before
    `hook_z` see only those; the rest join at its `hook_z` with `joining_z[l]` (a z,
    [batch, seq, heads, d_head], as it reaches `hook_z`: that point's hooks then act on it)
    repeated, or, for an int `n`, copies of the first `n` rows' z as computed. They still enter
    the block with a residual, as above, which the attention's output is added to; the block's
    hooks outside the attention see every row it computes."""
    counts = sorted(active.items())
    attending = dict(attending or {})
    if counts and not 0 <= counts[0][0] <= counts[-1][0] < len(layers):
        raise InputError(f"blocks {sorted(active)} are not all in this stack's {len(layers)} blocks")
    if any(b[1] < a[1] for a, b in zip(counts, counts[1:])):
        raise InputError(f"rows can only join a growing batch, not leave it: {dict(counts)}")
    computed = {layer: previous for (layer, _), (_, previous) in zip(counts, [(None, 0), *counts[:-1]])}
    for layer, a in attending.items():
        template = joining_z if isinstance(joining_z, int) else 0
        if layer not in active or not max(computed[layer], template) <= a <= active[layer]:
            raise InputError(f"block {layer}'s attention must compute between the rows the block below computed (and "
                             f"the template rows) and the rows the block computes; got {a} of "
                             f"{active.get(layer, 'no rows (not in active)')}")
        if a < active[layer] and not isinstance(joining_z, int) and layer not in (joining_z or {}):
            raise InputError(f"rows join block {layer} at hook_z, but joining_z gives no z for it")
    attentions = {layer: _attention_of(layers[layer]) for layer, a in attending.items() if a < active[layer]}
    saved = {layer: layers[layer].__dict__.get("forward") for layer in active}

    def grown(layer: int, forward: Any) -> Any:
        n, before = active[layer], computed[layer]
        attends = attending.get(layer, n)

        def fill_z(z: Tensor | None) -> Tensor:
            join = z[:joining_z] if isinstance(joining_z, int) else joining_z[layer]
            join = _filled(join, n - attends, f"block {layer} at hook_z", join if z is None else z)
            return join if z is None else torch.cat([z, join])

        def run(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
            rows = hidden_states.shape[0]
            if n > rows:
                raise InputError(f"block {layer} is asked to compute {n} rows of a batch of {rows}")
            cut = hidden_states[:n]
            if n > before > 0:
                join = hidden_states[:joining] if isinstance(joining, int) else joining.get(layer)
                if join is not None:
                    cut = torch.cat([hidden_states[:before], _filled(join, n - before, f"block {layer}", hidden_states)])
            attention = attentions.get(layer)
            if attention is not None:
                setattr(attention, Z_JOIN, (attends, fill_z))
            try:
                out = forward(cut, *(first_rows(a, rows, n) for a in args),
                              **{k: first_rows(v, rows, n) for k, v in kwargs.items()})
            finally:
                if attention is not None:
                    setattr(attention, Z_JOIN, None)
            if n == rows:
                return out
            head = out[0] if isinstance(out, tuple) else out
            whole = torch.cat([head, hidden_states[n:]])
            return (whole, *out[1:]) if isinstance(out, tuple) else whole
        return run

    try:
        for layer in active:
            layers[layer].forward = grown(layer, layers[layer].forward)
        yield
    finally:
        for layer, forward in saved.items():
            if forward is None:
                del layers[layer].forward
            else:
                layers[layer].forward = forward
