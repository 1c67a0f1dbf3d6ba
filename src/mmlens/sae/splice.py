"""Splicing SAEs into a HookedMLLM at any hook point, with SAELens's `HookedSAETransformer` API.

SAELens swaps the hook point for the SAE module (`analysis/hooked_sae_transformer.py`); mmlens's
points are fired from inside Hugging Face's forwards, so the point stays and a permanent hook,
first in line, replaces its activation with the SAE's output. The SAE's own points join the
model's hook tree under the point's name (`blocks.3.hook_resid_post.hook_sae_acts_post`), so
`run_with_cache`, `names_filter` and `run_with_hooks` reach them while it is spliced; hooks added
to the point itself see what the model goes on with (the SAE's output). A transcoder reads its
`hook_name` and writes its `hook_name_out`. Widths are checked before any forward where the
config says the point's width, and on the first activation elsewhere.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from torch import Tensor
from transformer_lens.hook_points import HookPoint, LensHandle

from ..errors import InputError
from ..model.hook_names import parse_hook_name
from .sae import HOOK_POINTS, SAE

if TYPE_CHECKING:
    from ..model import HookedMLLM

# sites whose width is the stage's d_model, whatever the family
_RESIDUAL_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
_LLM_WIDTH_POINTS = ("hook_embed", "hook_multimodal_embed", "ln_final.hook_normalized", "adapter.hook_out")


@dataclass
class _Splice:
    """One SAE in a model: where it reads and writes, the hooks that do it, what to undo."""

    sae: SAE
    point_in: HookPoint
    point_out: HookPoint
    handles: list[tuple[HookPoint, LensHandle]] = field(default_factory=list)
    original_use_error_term: bool = False
    pending_input: list[Tensor] = field(default_factory=list)  # a transcoder's input, until its output fires
    displaced: "_Splice | None" = None  # the splice this one stepped in for, restored by reset_saes


def expected_width(model: "HookedMLLM", hook_name: str, flatten_heads: bool = False) -> int | None:
    """The last dimension of the activation at `hook_name` as the model's config gives it (with
    `flatten_heads`, heads times d_head at a per-head point), None where it does not."""
    parsed = parse_hook_name(hook_name)
    stage = model.cfg.vision if parsed.stage == "vision" else model.cfg.llm
    if parsed.layer is not None and parsed.site in _RESIDUAL_SITES:
        return stage.d_model
    if parsed.layer is not None and flatten_heads and parsed.site == "attn.hook_z":
        return stage.n_heads * stage.d_head
    if parsed.layer is None and hook_name in _LLM_WIDTH_POINTS:
        return model.cfg.llm.d_model
    return None


def add_sae(model: "HookedMLLM", sae: SAE, use_error_term: bool | None = None) -> None:
    """Splice `sae` at its `cfg.hook_name` until `reset_saes`. An SAE already there steps aside
    as it is (SAELens's overwrite) and comes back when `reset_saes` names it in `prev_saes`.
    `use_error_term` (None: the SAE's own setting) keeps the forward unchanged."""
    name_in, name_out = _checked_points(model, sae)
    splices = _splices(model)
    displaced = splices.pop(name_in, None)
    if displaced is not None:
        _detach(displaced)
    splice = _Splice(sae, model.hook_dict[name_in], model.hook_dict[name_out],
                     original_use_error_term=sae.use_error_term, displaced=displaced)
    if use_error_term is not None:
        sae.use_error_term = use_error_term
    _attach(model, name_in, splice)


def reset_saes(model: "HookedMLLM", act_names: str | Sequence[str] | None = None,
               prev_saes: Sequence[SAE | None] | None = None) -> None:
    """Take the SAEs at `act_names` (default: all) out, or put back `prev_saes` there."""
    splices = _splices(model)
    names = [act_names] if isinstance(act_names, str) else list(splices) if act_names is None else list(act_names)
    names = [model.resolve_hook_name(name) for name in names]
    previous = list(prev_saes) if prev_saes else [None] * len(names)
    if len(previous) != len(names):
        raise InputError(f"reset_saes got {len(names)} hook names but {len(previous)} SAEs to restore")
    for name, prev in zip(names, previous):
        splice = splices.pop(name, None)
        if splice is None:
            continue
        _detach(splice)
        splice.sae.use_error_term = splice.original_use_error_term
        splice.sae.setup()  # its points answer to their own names again
        del model.acts_to_saes[name]
        if splice.displaced is not None and splice.displaced.sae is prev:
            _attach(model, name, splice.displaced)  # as it was, error-term setting included
        elif prev is not None:
            add_sae(model, prev)
    model.setup()


def _attach(model: "HookedMLLM", name: str, splice: _Splice) -> None:
    if splice.sae.cfg.is_transcoder:
        _add_first_hook(splice, splice.point_in, _reader(splice))
        _add_first_hook(splice, splice.point_out, _transcoder_writer(splice))
    else:
        _add_first_hook(splice, splice.point_in, _replacer(splice))
    for point_name in HOOK_POINTS:
        splice.point_in.add_module(point_name, getattr(splice.sae, point_name))
    _splices(model)[name] = splice
    model.acts_to_saes[name] = splice.sae
    model.setup()


def _detach(splice: _Splice) -> None:
    for point, handle in splice.handles:
        handle.hook.remove()
        point.fwd_hooks = [kept for kept in point.fwd_hooks if kept is not handle]
    splice.handles.clear()
    for point_name in HOOK_POINTS:
        delattr(splice.point_in, point_name)


@contextmanager
def spliced(model: "HookedMLLM", saes: SAE | Sequence[SAE] = (), reset_saes_end: bool = True,
            use_error_term: bool | None = None) -> Iterator["HookedMLLM"]:
    """SAEs spliced for the block (`model.saes(...)`); on leaving, the SAEs that were there
    before come back."""
    listed = [saes] if isinstance(saes, SAE) else list(saes)
    _splices(model)
    for sae in listed:  # every SAE is checked before any is spliced
        _checked_points(model, sae)
    names, previous = [], []
    try:
        for sae in listed:
            name = model.resolve_hook_name(sae.cfg.hook_name)
            names.append(name)
            previous.append(model.acts_to_saes.get(name))
            add_sae(model, sae, use_error_term=use_error_term)
        yield model
    finally:
        if reset_saes_end:
            # the last splice at a point first, so its first one's predecessor is what stays
            for name, prev in reversed(list(zip(names, previous))):
                reset_saes(model, [name], [prev])


def _add_first_hook(splice: _Splice, point: HookPoint, hook: Any) -> None:
    """A permanent hook that runs before any other on `point` (so hooks on the point see the SAE's
    output, whenever they were added)."""
    handle = point.add_hook(hook, is_permanent=True, prepend=True)
    if handle is None:  # TransformerLens 3 returns no handle; a prepended one is first in the list
        handle = point.fwd_hooks[0]
    splice.handles.append((point, handle))


def _splices(model: "HookedMLLM") -> dict[str, _Splice]:
    if "_sae_splices" not in vars(model):
        model._sae_splices = {}
        model.acts_to_saes = {}  # SAELens's public name: hook name -> spliced SAE
    return model._sae_splices


def _checked_points(model: "HookedMLLM", sae: SAE) -> tuple[str, str]:
    """The canonical names the SAE reads and writes, once its widths match them."""
    if not isinstance(sae, SAE):
        raise InputError(f"expected an mmlens SAE, got {type(sae).__name__}; mmlens.load_sae converts a sae-lens SAE")
    cfg = sae.cfg
    if not cfg.hook_name:
        raise InputError(f"{sae!r} names no hook point: pass hook_name= to mmlens.load_sae or set "
                         "sae.cfg.metadata['hook_name'] (model.hook_names() lists them)")
    if cfg.is_transcoder and not cfg.hook_name_out:
        raise InputError(f"{sae!r} is a transcoder without hook_name_out: pass hook_name_out= to mmlens.load_sae")
    name_in = model.resolve_hook_name(cfg.hook_name)
    name_out = model.resolve_hook_name(cfg.hook_name_out)
    for name, width, which in ((name_in, cfg.d_in, "d_in"), (name_out, cfg.d_out, "d_out")):
        expected = expected_width(model, name, flatten_heads=cfg.reshape_activations == "hook_z")
        if expected is not None and expected != width:
            raise InputError(f"{sae!r} has {which}={width} but {name} is {expected} wide in this model; "
                             "load the SAE trained for this point and model")
    return name_in, name_out


def _check_activation(splice: _Splice, activation: Tensor, width: int, name: str) -> None:
    heads = splice.sae.cfg.reshape_activations == "hook_z"
    seen = activation.shape[-2] * activation.shape[-1] if heads else activation.shape[-1]
    if seen != width:
        raise InputError(f"{splice.sae!r} expects activations {width} wide, but {name} gives shape "
                         f"{tuple(activation.shape)}; load the SAE trained for this point and model")


def _on_device(splice: _Splice, activation: Tensor) -> Tensor:
    return activation.to(splice.sae.W_enc.device)


def _replacer(splice: _Splice):
    def splice_sae(activation: Tensor, hook: HookPoint) -> Tensor:
        _check_activation(splice, activation, splice.sae.cfg.d_in, hook.name)
        return splice.sae(_on_device(splice, activation)).to(device=activation.device, dtype=activation.dtype)
    return splice_sae


def _reader(splice: _Splice):
    def read_transcoder_input(activation: Tensor, hook: HookPoint) -> None:
        _check_activation(splice, activation, splice.sae.cfg.d_in, hook.name)
        splice.pending_input[:] = [activation]
    return read_transcoder_input


def _transcoder_writer(splice: _Splice):
    def write_transcoder_output(activation: Tensor, hook: HookPoint) -> Tensor:
        if not splice.pending_input:
            raise InputError(f"{splice.sae!r} writes {hook.name} but its input point did not fire before it in this "
                             "forward; a transcoder reads a point earlier in the forward than the one it writes")
        _check_activation(splice, activation, splice.sae.cfg.d_out, hook.name)
        source = _on_device(splice, splice.pending_input.pop())
        sae = splice.sae
        out = sae.output_with_error(source, _on_device(splice, activation)) if sae.use_error_term else sae(source)
        return out.to(device=activation.device, dtype=activation.dtype)
    return write_transcoder_output


def run_with_saes(model: "HookedMLLM", *model_args: Any, saes: SAE | Sequence[SAE] = (), reset_saes_end: bool = True,
                  use_error_term: bool | None = None, **model_kwargs: Any) -> Any:
    """`model(...)` with `saes` spliced in for this one call (SAELens's `HookedSAETransformer.run_with_saes`)."""
    with spliced(model, saes, reset_saes_end, use_error_term):
        return model(*model_args, **model_kwargs)


def run_with_cache_with_saes(model: "HookedMLLM", *model_args: Any, saes: SAE | Sequence[SAE] = (),
                             reset_saes_end: bool = True, use_error_term: bool | None = None, **kwargs: Any) -> Any:
    """`model.run_with_cache(...)` with `saes` spliced in for this one call."""
    with spliced(model, saes, reset_saes_end, use_error_term):
        return model.run_with_cache(*model_args, **kwargs)


def run_with_hooks_with_saes(model: "HookedMLLM", *model_args: Any, saes: SAE | Sequence[SAE] = (),
                             reset_saes_end: bool = True, **kwargs: Any) -> Any:
    """`model.run_with_hooks(...)` with `saes` spliced in for this one call."""
    with spliced(model, saes, reset_saes_end):
        return model.run_with_hooks(*model_args, **kwargs)
