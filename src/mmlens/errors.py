"""The errors mmlens raises on purpose, under one root so a script can catch them all.

Each kind also subclasses the built-in exception it used to be (`KeyError`, `ValueError`, ...),
so code written against those keeps working. Every message says what was wrong and what to do.
"""

from __future__ import annotations


class MMLensError(Exception):
    """Root of every error mmlens raises on purpose."""


class HookNameError(MMLensError, KeyError):
    """An unknown hook name; the message lists the closest known names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(MMLensError, NotImplementedError):
    """A model family (or a configuration of one) mmlens cannot instrument; lists the supported ones."""


class HookReturnError(MMLensError, ValueError):
    """A hook returned something other than a tensor of the shape, dtype and device it received
    (which PyTorch would otherwise broadcast or promote silently); names the point and the hook."""


class LayoutMismatchError(MMLensError, ValueError):
    """Inputs, activations or masks whose image-token layout does not match what was expected."""


class InputError(MMLensError, ValueError):
    """Bad input to a model call or an analysis: wrong shape, size, value or type of argument."""


class ModelLoadError(MMLensError, OSError):
    """A checkpoint that cannot be loaded: missing, damaged, or an unusable dtype/device."""


class ConfigError(MMLensError, ValueError):
    """Every problem found in a study configuration, one per line."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s){where}:\n{lines}")


class RunFolderError(MMLensError, RuntimeError):
    """The run folder cannot be used as asked (another study's results, damaged files, locked)."""


class HubUnavailableError(MMLensError, ConnectionError):
    """The hub could not be reached; the message says how to use local files instead."""


__all__ = [
    "ConfigError",
    "HookNameError",
    "HookReturnError",
    "HubUnavailableError",
    "InputError",
    "LayoutMismatchError",
    "MMLensError",
    "ModelLoadError",
    "RunFolderError",
    "UnsupportedModelError",
]
