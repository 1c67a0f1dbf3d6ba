"""A named set of forward hooks that is both a context manager and a `run_with_hooks` list."""

from __future__ import annotations

from typing import Callable

from ..model import HookedMLLM


class HookSet:
    model: HookedMLLM
    hooks: list[tuple[str, Callable]]

    def __enter__(self):
        self._context = self.model.hooks(fwd_hooks=self.hooks)
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)
