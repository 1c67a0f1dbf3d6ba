"""Progress bars with one policy: true rates, no redraw storms, and one switch to silence them all.

A bar's rate is the units it counts over the time since it started (tqdm's exponential smoothing
is off): a bar redrawn between units, as the probe fits are on each L-BFGS evaluation, would
otherwise feed its average many zero-unit intervals and report rates and ETAs tens of times too
fast. Into a terminal a bar redraws at most ten times a second; into a file or pipe, where every
redraw stays in the log, a bar shows only once it has run `FILE_INTERVAL_S`, then at most once per
that interval, and keeps its last line (stages report one line each when they end). `quiet()`
turns off mmlens's bars and those of transformers, datasets and huggingface_hub, with their info
logging, and restores them when it ends.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TextIO

from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as text_tqdm

from .lazy import after_import

TERMINAL_INTERVAL_S = 0.1
FILE_INTERVAL_S = 30.0
_quiet_depth = 0


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str,
                 enabled: bool = True, leave: bool = False, file: TextIO | None = None) -> text_tqdm:
    """A bar counting `unit`s (`total` of them, or the items of `iterable`); `enabled=False` or an
    active `quiet()` gives a silent one. `file` defaults to stderr, so stdout stays the command's."""
    stream = sys.stderr if file is None else file
    terminal = _is_terminal(stream)
    interval = TERMINAL_INTERVAL_S if terminal else FILE_INTERVAL_S
    bar_class = auto_tqdm if file is None and auto_tqdm is not text_tqdm else text_tqdm  # notebooks: a widget
    return bar_class(iterable, total=total, desc=desc, unit=unit, file=stream, disable=not enabled or is_quiet(),
                     leave=leave or not terminal, smoothing=0, miniters=0,
                     mininterval=interval, maxinterval=max(10.0, interval), dynamic_ncols=terminal,
                     delay=0 if terminal else FILE_INTERVAL_S)


def note(message: str, *, enabled: bool = True) -> None:
    """One line of progress news (a stage finished), printed above any bar on stderr; silent when quiet."""
    if not enabled or is_quiet():
        return
    if _is_terminal(sys.stderr):
        text_tqdm.write(message, file=sys.stderr)  # clears the bars, prints, draws them again below
    else:  # a log: tqdm.write would redraw every open bar around the line
        print(message, file=sys.stderr, flush=True)


def is_quiet() -> bool:
    return _quiet_depth > 0


@contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Within it no progress bar draws, mmlens's or its libraries', and their info logging is off."""
    global _quiet_depth
    if not enabled:
        yield
        return
    _quiet_depth += 1
    restores: list[Callable[[], None]] = []
    bars_before: dict[str, bool] = {}  # library -> its bars were on before quiet() (or on by default)
    loaded = {library for library in _LIBRARIES if library in sys.modules}
    # each library is silenced now if it is loaded, else as soon as the run loads it
    cancels = [after_import(library, lambda library=library: restores.append(
        _silence(library, bars_before, default=library not in loaded))) for library in _LIBRARIES]
    try:
        yield
    finally:
        _quiet_depth -= 1
        for cancel in cancels:
            cancel()
        # last silenced, first restored: huggingface_hub, which the others switch along with
        # their own bars, is set last
        for restore in reversed(restores):
            restore()


# library -> (the module with its bar switches, the test whether bars are on, off, on, its logging module)
_LIBRARIES = {
    "huggingface_hub": ("huggingface_hub.utils", "are_progress_bars_disabled", "disable_progress_bars",
                        "enable_progress_bars", "huggingface_hub.utils.logging"),
    "transformers": ("transformers.utils.logging", "is_progress_bar_enabled", "disable_progress_bar",
                     "enable_progress_bar", "transformers.utils.logging"),
    "datasets": ("datasets", "is_progress_bar_enabled", "disable_progress_bars", "enable_progress_bars",
                 "datasets.utils.logging"),
}


def _default_bars_on(library: str, bars_before: dict[str, bool]) -> bool:
    """Whether `library`'s bars are on once it is imported, had it been imported outside quiet():
    on, unless its environment variable turns them off; transformers copies huggingface_hub's
    setting as it imports (a hub silenced by quiet() would read as off)."""
    if library == "huggingface_hub":
        from huggingface_hub import constants

        return constants.HF_HUB_DISABLE_PROGRESS_BARS is not True
    if library == "transformers":
        return bars_before.get("huggingface_hub", _default_bars_on("huggingface_hub", bars_before))
    from datasets import config

    return config.HF_DATASETS_DISABLE_PROGRESS_BARS is not True


def _silence(library: str, bars_before: dict[str, bool], *, default: bool) -> Callable[[], None]:
    """Turn off the library's bars and info logging; returns what puts them back as they were
    before quiet() began (`default`: the library was first imported inside it, so back to its default)."""
    switches_name, test, off, on, logging_name = _LIBRARIES[library]
    switches, logging = importlib.import_module(switches_name), importlib.import_module(logging_name)

    def bars_on() -> bool:
        return getattr(switches, test)() != test.startswith("are_")  # "are_..._disabled" reads the other way

    bars_were_on = _default_bars_on(library, bars_before) if default else bars_on()
    bars_before[library] = bars_were_on
    verbosity = logging.get_verbosity()
    getattr(switches, off)()
    logging.set_verbosity_error()

    def restore() -> None:
        logging.set_verbosity(verbosity)
        if bars_on() != bars_were_on:
            getattr(switches, on if bars_were_on else off)()

    return restore


def _is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is read live, as it is drawn: a terminal, or a notebook's output (where
    ipykernel's stdout and stderr say they are no terminal)."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # a closed or file-like object without a terminal behind it
        return False
    return (stream is sys.stderr or stream is sys.stdout) and _in_notebook_kernel()


def _in_notebook_kernel() -> bool:
    """Whether this process is an IPython kernel (Jupyter, VS Code notebooks), not a plain IPython shell."""
    if "ipykernel" not in sys.modules or "IPython" not in sys.modules:
        return False
    try:
        shell = sys.modules["IPython"].get_ipython()
    except Exception:  # an IPython too old or too new to ask
        return False
    return getattr(shell, "kernel", None) is not None


__all__ = ["FILE_INTERVAL_S", "TERMINAL_INTERVAL_S", "is_quiet", "note", "progress_bar", "quiet"]
