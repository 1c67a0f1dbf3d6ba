"""Lazy imports: a package's public names resolved on first use, and work deferred until a module loads.

Importing torch, transformers and TransformerLens costs seconds of CPU, so `import mmlens` and the
`mmlens` command must not pay it before they need a model: a package lists where each public
name lives and PEP 562's module `__getattr__` imports it on first access. Work that must follow
a heavy module wherever it is imported from (the shipped models registering with the model
loader) runs from an import hook right after that module executes, not eagerly at package import.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(`__getattr__`, `__dir__`) for `package`, where `exports` maps a public name to the module
    (relative to the package, e.g. ".model") that defines it; a module's own name maps to itself."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            if not name.startswith("__") and _is_submodule(f"{package}.{name}"):  # e.g. mmlens.checksums
                return importlib.import_module(f"{package}.{name}")  # the import sets it on the package
            close = difflib.get_close_matches(name, list(exports), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise AttributeError(f"module {package!r} has no attribute {name!r}{hint}")
        module = importlib.import_module(exports[name], package)
        value = module if exports[name].rsplit(".", 1)[-1] == name else getattr(module, name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__


def _is_submodule(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs `then()` right after the module named `target` executes, however it was imported.

    It stands in as the module's loader only while the module executes: the module's `__loader__`
    and `__spec__.loader` are the real loader again before its code runs, so `pkgutil.get_data`,
    `importlib.resources` and the like see the loader they expect."""

    def __init__(self, target: str, then: Callable[[], None]):
        self.target, self.then, self.loader = target, then, None

    def __getattr__(self, name: str) -> Any:  # anything else a loader offers: the real loader's
        loader = self.__dict__.get("loader")
        if loader is None:
            raise AttributeError(name)
        return getattr(loader, name)

    def find_spec(self, name: str, path: Any, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name != self.target:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # once: the module is now in sys.modules
        _call(self.target, self.then)


def _call(target: str, then: Callable[[], None]) -> None:
    try:
        then()
    except Exception as error:  # e.g. a library renamed what `then` calls: importing it still works
        warnings.warn(f"mmlens: the step run after importing {target} failed ({type(error).__name__}: {error})",
                      RuntimeWarning, stacklevel=3)


def after_import(target: str, then: Callable[[], None]) -> Callable[[], None]:
    """Call `then()` once `target` has been imported: now if it already is, else right after it is.
    An exception from `then()` becomes a `RuntimeWarning`: it never fails the import. Returns a
    function that cancels a call still waiting for the import."""
    if target in sys.modules:
        _call(target, then)
        return lambda: None
    finder = _AfterImport(target, then)
    sys.meta_path.insert(0, finder)
    return lambda: sys.meta_path.remove(finder) if finder in sys.meta_path else None
