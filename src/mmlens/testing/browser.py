"""Open an HTML file in a real headless browser and check that its plotly figures rendered.

Chromium loads the page from `file://` with every host name unresolvable, so a figure that
needs the network cannot render. `--dump-dom` returns the DOM after the page's scripts ran
(under a virtual-time budget); a plotly figure has rendered when its div holds an
`svg.main-svg`. A screenshot tells a blank page from a drawn one.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image

from ..viz.chromium import CHROMIUM_CANDIDATES, find_chromium  # noqa: F401 - re-exported for the browser checks

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--hide-scrollbars", "--mute-audio",
    # Every host resolves to nothing: the page must render from the file alone.
    "--host-resolver-rules=MAP * ~NOTFOUND",
)
_VOID_ELEMENTS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class BrowserError(RuntimeError):
    """Chromium is missing, failed, or timed out."""


def _run_chromium(args: list[str], html_path: Path, timeout: float) -> subprocess.CompletedProcess:
    chromium = find_chromium()
    if chromium is None:
        raise BrowserError("no Chromium found; install it (Debian: apt-get install chromium) or set MMLENS_CHROMIUM")
    with tempfile.TemporaryDirectory(prefix="mmlens-chromium-") as profile:
        command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, html_path.resolve().as_uri()]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise BrowserError(f"chromium did not finish within {timeout:.0f} s: {' '.join(command)}") from error
    if done.returncode != 0:
        raise BrowserError(f"chromium exited with {done.returncode}: {done.stderr[-2000:]}")
    return done


def dump_dom(html_path: str | os.PathLike, *, virtual_time_ms: int = 10_000, timeout: float = 120,
             window: tuple[int, int] | None = None) -> str:
    """The page's DOM after its scripts ran (Chromium `--dump-dom`), laid out in a `window`
    (width, height) in CSS pixels when given (a phone is (390, 844))."""
    size = [f"--window-size={window[0]},{window[1]}"] if window else []
    done = _run_chromium([f"--virtual-time-budget={virtual_time_ms}", *size, "--dump-dom"], Path(html_path), timeout)
    if "<body" not in done.stdout:
        raise BrowserError(f"chromium returned no DOM; stderr: {done.stderr[-2000:]}")
    return done.stdout


def screenshot(html_path: str | os.PathLike, png_path: str | os.PathLike, *, width: int = 1280, height: int = 3000,
               virtual_time_ms: int = 10_000, timeout: float = 120) -> Path:
    """A PNG of the page's first `height` pixels at `width` wide."""
    png_path = Path(png_path).resolve()
    _run_chromium([f"--virtual-time-budget={virtual_time_ms}", f"--window-size={width},{height}",
                   f"--screenshot={png_path}"], Path(html_path), timeout)
    if not png_path.exists():
        raise BrowserError(f"chromium wrote no screenshot at {png_path}")
    return png_path


class _FigureCounter(HTMLParser):
    """Counts `svg.main-svg` elements inside every `div.plotly-graph-div`, by the div's id."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.svgs: dict[str, int] = {}
        self._stack: list[str | None] = []  # per open element: the figure it sits in, if any

    def handle_starttag(self, tag, attrs):
        if tag in _VOID_ELEMENTS:
            return
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        figure = self._stack[-1] if self._stack else None
        if tag == "div" and "plotly-graph-div" in classes:
            figure = attrs.get("id") or f"unnamed-{len(self.svgs)}"
            self.svgs.setdefault(figure, 0)
        elif tag == "svg" and "main-svg" in classes and figure is not None:
            self.svgs[figure] += 1
        self._stack.append(figure)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in _VOID_ELEMENTS:
            self._stack.pop()

    def handle_endtag(self, tag):
        if tag not in _VOID_ELEMENTS and self._stack:
            self._stack.pop()


def rendered_figures(dom: str) -> dict[str, int]:
    """For every plotly figure div in `dom` (by id), how many `svg.main-svg` it holds (0 = not rendered)."""
    counter = _FigureCounter()
    counter.feed(dom)
    counter.close()
    return counter.svgs


def drawn_fraction(png_path: str | os.PathLike, background: tuple[int, int, int] | None = None, tolerance: int = 8) -> float:
    """Fraction of the screenshot's pixels that differ from its background colour (the most common
    colour unless given); 0.0 is a blank page."""
    pixels = np.asarray(Image.open(png_path).convert("RGB")).reshape(-1, 3).astype(np.int16)
    if background is None:
        colours, counts = np.unique(pixels, axis=0, return_counts=True)
        background = tuple(colours[counts.argmax()])
    differs = np.abs(pixels - np.asarray(background, dtype=np.int16)).max(axis=1) > tolerance
    return float(differs.mean())
