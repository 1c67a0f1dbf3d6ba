"""Figures written as HTML files that open offline and share one copy of plotly.js per folder.

plotly.js is 4.8 MB: inlined in every figure, a folder of ten figures weighs 50 MB; loaded from
the CDN, a figure is blank without network. Instead each folder gets one `plotly.min.js` (the
bundle of the installed plotly, rewritten when the version changes) and every page loads it by a
relative path, so the folder opens from disk, offline, and can be moved or shared whole.
Static images (PNG, SVG, PDF) go through plotly's own export, kaleido, which renders the figure
in a headless Chrome or Chromium: the same plotly.js draws the file and the page.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import plotly
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from ..errors import InputError, MMLensError
from .chromium import find_chromium

PLOTLY_JS = "plotly.min.js"
FIGURE_CONFIG = {"displaylogo": False, "responsive": True}
HTML_SUFFIXES = (".html", ".htm")
STATIC_SUFFIXES = (".png", ".svg", ".pdf")
EXPORT_EXTRA = 'pip install "mmlens[export]"'


class StaticExportError(MMLensError, RuntimeError):
    """A static image could not be written: kaleido or a Chrome / Chromium is missing, or it failed."""


def write_plotly_js(folder: str | os.PathLike) -> Path:
    """`folder/plotly.min.js`, written unless a copy of the installed version is already there."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PLOTLY_JS
    bundle = get_plotlyjs()
    if path.exists() and _version_line(path.read_text(encoding="utf-8", errors="replace")) == _version_line(bundle):
        return path
    temporary = path.with_name(f".{PLOTLY_JS}.tmp")
    temporary.write_text(bundle, encoding="utf-8")
    os.replace(temporary, path)
    return path


def save_figure(figure: go.Figure, path: str | os.PathLike, *, scale: float = 2.0) -> Path:
    """Write `figure` at `path` in the format its suffix names.

    `.html` / `.htm`: a full page that loads `plotly.min.js` from its own folder (written there if
    needed); opens offline, no CDN, no MathJax. `.png`, `.svg`, `.pdf`: a static image drawn by
    plotly's `write_image` (kaleido, the `export` extra, and an installed Chrome or Chromium; PNG at
    `scale` times the figure's size). Any other suffix is refused, so a name never promises a format
    the file is not."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in STATIC_SUFFIXES:
        return _write_static(figure, path, scale)
    if suffix not in HTML_SUFFIXES:
        raise InputError(
            f"save_figure cannot write {path.name!r}: it writes {', '.join(HTML_SUFFIXES + STATIC_SUFFIXES)}; "
            f"name the file e.g. {path.with_suffix('.html').name!r} (interactive, offline) or "
            f"{path.with_suffix('.png').name!r} (static image)"
        )
    write_plotly_js(path.parent)
    page = figure.to_html(include_plotlyjs=False, include_mathjax=False, full_html=True, config=FIGURE_CONFIG)
    page = page.replace("</head>", f'<script src="{PLOTLY_JS}"></script>\n</head>', 1)
    path.write_text(page, encoding="utf-8")
    return path


def _write_static(figure: go.Figure, path: Path, scale: float) -> Path:
    try:
        import kaleido  # noqa: F401 - plotly's exporter; only its absence is checked here
    except ImportError:
        raise StaticExportError(
            f"writing {path.name!r} needs kaleido, plotly's image exporter: {EXPORT_EXTRA} (or pip install "
            f"'kaleido>=1,<2'); save_figure(figure, {str(path.with_suffix('.html'))!r}) needs nothing more"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    # written beside the target and moved into place: a failed export leaves no half-written file
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        with _kaleido_finds_chromium():
            figure.write_image(temporary, format=path.suffix.lower()[1:], scale=scale)
    except Exception as error:
        temporary.unlink(missing_ok=True)
        if "chrom" in str(error).lower() or type(error).__name__ == "ChromeNotFoundError":
            raise StaticExportError(
                f"writing {path.name!r} needs a Chrome or Chromium, which kaleido ({EXPORT_EXTRA}) drives, and none "
                f"was found{' at BROWSER_PATH=' + os.environ['BROWSER_PATH'] if os.environ.get('BROWSER_PATH') else ''}; "
                "install one (Debian: apt-get install chromium; or run `plotly_get_chrome`) or point BROWSER_PATH at it"
            ) from error
        raise StaticExportError(f"kaleido could not write {path.name!r}: {type(error).__name__}: {error}") from error
    os.replace(temporary, path)
    return path


@contextmanager
def _kaleido_finds_chromium():
    """Kaleido's browser finder (choreographer) reads BROWSER_PATH and looks for Chrome names on
    PATH; a Chromium the user named for mmlens (MMLENS_CHROMIUM) or Debian's /usr/bin/chromium
    may be neither, so name it for the export (unless the user already chose one) and put the
    environment back afterwards."""
    if os.environ.get("BROWSER_PATH") or (found := find_chromium()) is None:
        yield
        return
    os.environ["BROWSER_PATH"] = found
    try:
        yield
    finally:
        os.environ.pop("BROWSER_PATH", None)


def _version_line(bundle: str) -> str:
    # the bundle opens with a banner naming its version ("* plotly.js v4.1.1")
    start = bundle.find("plotly.js v")
    return bundle[start : start + 24] if start >= 0 else f"unknown {plotly.__version__}"


__all__ = ["PLOTLY_JS", "STATIC_SUFFIXES", "StaticExportError", "save_figure", "write_plotly_js"]
