"""Running part of a transformer stack: stop before block l, or start at block l from a residual.

TransformerLens's `stop_at_layer=l` returns the residual entering block `l` (`n_layers`: after
the last block, before the final norm); `start_at_layer=l` takes that residual and runs the
rest. Here the Hugging Face model runs as usual: a hook on block `l` raises with its input to
stop, and blocks below `l` pass their input through unchanged to start (block `l` is handed the
residual), so masks, positions and rotary embeddings are built by HF's own code.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager

from torch import Tensor, nn

from ..errors import InputError


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
            layer.forward = lambda hidden_states, *args, **kwargs: hidden_states
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
