"""Progress bars: the rate a bar shows is units over time, a log file gets few lines, quiet means silent."""

from __future__ import annotations

import io
import re
import sys
import time
import types

from tqdm import tqdm

import mmlens.progress as progress
from mmlens.progress import note, progress_bar, quiet

UNITS, REDRAWS_PER_UNIT, PAUSE_S = 12, 8, 0.004


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _work(bar) -> float:
    """UNITS units, each redrawn REDRAWS_PER_UNIT times in between (as probe fits are on every
    L-BFGS evaluation, a unit arriving just after a redraw); the units per second. The bar runs
    on a clock of its own that the work advances (tqdm reads time through `bar._time`), so the
    numbers do not depend on how busy the machine is."""
    now = [1000.0]
    bar._time = lambda: now[0]
    bar.start_t = bar.last_print_t = now[0]
    for _ in range(UNITS):
        for _ in range(REDRAWS_PER_UNIT):
            now[0] += PAUSE_S
            bar.update(0)
        now[0] += PAUSE_S / 1000
        bar.update(1)
    return bar.n / (now[0] - 1000.0)


def _shown_rate(frame: str, unit: str) -> float:
    value, per = re.search(rf"([\d.]+)(s/{unit}|{unit}/s)", frame).groups()
    return float(value) if per == f"{unit}/s" else 1 / float(value)


def test_the_rate_shown_is_units_over_time_despite_redraws_between_units():
    bar = progress_bar(total=UNITS * 2, desc="fits", unit="probe", file=Terminal())
    measured = _work(bar)
    shown = _shown_rate(str(bar), "probe")
    bar.close()
    assert abs(shown / measured - 1) < 0.01, (shown, measured)
    # tqdm's default smoothing, fed the zero-unit redraws, is far off: what the probe-fit bar showed
    plain = tqdm(total=UNITS * 2, file=Terminal(), unit="probe", miniters=0, mininterval=0)
    measured = _work(plain)
    assert _shown_rate(str(plain), "probe") / measured > 2
    plain.close()


def test_a_log_file_gets_a_few_lines_not_a_redraw_per_update(monkeypatch):
    monkeypatch.setattr(progress, "FILE_INTERVAL_S", 0.05)
    log = io.StringIO()  # not a terminal
    bar = progress_bar(total=400, desc="images", unit="image", file=log)
    started = time.perf_counter()
    for _ in range(400):
        time.sleep(0.0005)
        bar.update(1)
    elapsed = time.perf_counter() - started
    bar.close()
    frames = [f for f in re.split(r"[\r\n]", log.getvalue()) if f.strip()]
    assert 1 <= len(frames) <= elapsed / 0.05 + 2, (len(frames), elapsed)
    assert frames[-1].startswith("images: 100%") and log.getvalue().endswith("\n")  # the last state stays
    short = io.StringIO()
    with progress_bar(total=3, desc="quick", unit="image", file=short) as quick:
        quick.update(3)
    assert short.getvalue() == ""  # done before the interval: nothing in the log (the stage line says it)


def test_quiet_silences_bars_and_notes(capsys):
    with quiet():
        terminal = Terminal()
        bar = progress_bar(total=5, desc="x", unit="image", file=terminal)
        bar.update(5)
        bar.close()
        note("stage done")
    assert terminal.getvalue() == "" and capsys.readouterr().err == ""
    terminal = Terminal()
    with progress_bar(total=5, desc="x", unit="image", file=terminal) as bar:
        bar.update(5)
    note("stage done")
    assert "0/5" in terminal.getvalue() and capsys.readouterr().err == "stage done\n"  # drawn when it opened


def test_a_notebook_output_is_drawn_like_a_terminal(monkeypatch):
    """ipykernel's stderr says it is no terminal; in a notebook kernel a bar still draws at once
    and often (a log-file bar would show only after FILE_INTERVAL_S). A file stays a file."""
    stderr = io.StringIO()  # stands in for ipykernel's OutStream: isatty() is False
    monkeypatch.setattr(sys, "stderr", stderr)
    bar = progress_bar(total=3, desc="x", unit="image")
    assert (bar.delay, bar.mininterval) == (progress.FILE_INTERVAL_S, progress.FILE_INTERVAL_S)  # a plain log
    bar.close()
    shell = types.SimpleNamespace(kernel=object())  # an IPython shell run by a kernel
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    bar = progress_bar(total=3, desc="x", unit="image")
    assert (bar.delay, bar.mininterval) == (0, progress.TERMINAL_INTERVAL_S)
    bar.close()
    assert "0/3" in stderr.getvalue()  # drawn as it opened
    log = io.StringIO()
    with progress_bar(total=3, desc="x", unit="image", file=log) as bar:  # a file, even in a notebook
        assert bar.delay == progress.FILE_INTERVAL_S
    shell.kernel = None  # plain IPython in a terminal: its stderr's isatty() decides
    with progress_bar(total=3, desc="x", unit="image") as bar:
        assert bar.delay == progress.FILE_INTERVAL_S
