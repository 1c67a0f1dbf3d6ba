"""Edits as forward hooks: a named set of hooks that is both a context manager and a
`run_with_hooks` list, and the convention that an edit is a function of the inputs returning
such a set (or a plain list of hooks), since token groups resolve against each batch. It sits in
the model layer because probing (a sweep under an edit) and interventions (which make edits)
both use it, and neither may import the other's internals."""

from __future__ import annotations

from typing import Any, Callable

from .hooked_mllm import HookedMLLM
from .inputs import MultimodalInputs

# inputs -> forward hooks: a list of (hook name, hook) or an object with `hooks` (a HookSet)
Edit = Callable[[MultimodalInputs], Any]


class HookSet:
    model: HookedMLLM
    hooks: list[tuple[str, Callable]]

    def __enter__(self):
        self._context = self.model.hooks(fwd_hooks=self.hooks)
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)


def edit_hooks(edit: Edit | None, inputs: MultimodalInputs) -> tuple[list[tuple[str, Callable]], Any]:
    """The forward hooks an edit asks for on these inputs, and the edit object (to verify it)."""
    if edit is None:
        return [], None
    made = edit(inputs)
    hooks = getattr(made, "hooks", made)
    if not isinstance(hooks, (list, tuple)):
        raise TypeError("an edit must return a list of (hook name, hook) pairs or an object with a `hooks` list "
                        f"(knockout(...), bidirectional_image_attention(...)); got {type(made).__name__}")
    return list(hooks), made
