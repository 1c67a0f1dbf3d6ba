"""A run: one side of a patching experiment (inputs, and an edit applied in every forward of them).

`run_and_collect` is one forward of a run that keeps the activations asked for, and checks that
the run's edit took effect. Patching, its schedule and attribution patching all run through it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..model import HookedMLLM, MultimodalInputs
from ..model.edits import Edit, edit_hooks


@dataclass(frozen=True)
class Run:
    """One side of a patching experiment: inputs, and an edit applied in every forward of them.

    `edit(inputs)` must build its hooks for the inputs it is given: patching calls it on the
    inputs repeated once per condition (`repeat_inputs`), so masks must come from those inputs.
    """

    inputs: MultimodalInputs
    edit: Edit | None = None
    name: str = "run"


def as_run(run: Run | MultimodalInputs, name: str = "run") -> Run:
    if isinstance(run, Run):
        return run
    if isinstance(run, MultimodalInputs):
        return Run(run, name=name)
    raise TypeError(f"expected a Run or MultimodalInputs (from model.prepare), got {type(run).__name__}")


def verify_edit(made: Any) -> None:
    """A verified knockout must have left no attention on a blocked edge."""
    mass = getattr(made, "blocked_mass", None)
    if mass and max(mass.values()) != 0.0:
        raise RuntimeError(f"the edit left attention {max(mass.values())} on a blocked edge; it did not take effect")


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
