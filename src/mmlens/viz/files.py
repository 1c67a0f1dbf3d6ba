"""Figures written as HTML files that open offline and share one copy of plotly.js per folder.

plotly.js is 4.8 MB: inlined in every figure, a folder of ten figures weighs 50 MB; loaded from
the CDN, a figure is blank without network. Instead each folder gets one `plotly.min.js` (the
bundle of the installed plotly, rewritten when the version changes) and every page loads it by a
relative path, so the folder opens from disk, offline, and can be moved or shared whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import plotly
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from ..errors import InputError

PLOTLY_JS = "plotly.min.js"
FIGURE_CONFIG = {"displaylogo": False, "responsive": True}


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


def save_figure(figure: go.Figure, path: str | os.PathLike) -> Path:
    """Write `figure` as a full HTML page at `path` that loads `plotly.min.js` from its own folder
    (written there if needed). Opens offline; no CDN, no MathJax. Any other suffix is refused:
    an HTML page under a `.png` name would open as a broken image."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise InputError(
            f"save_figure writes interactive HTML pages, and {path.name!r} does not end in .html; name it "
            f"{path.with_suffix('.html').name!r}, or for a static image call figure.write_image({str(path)!r}) "
            "(plotly's export, which needs the kaleido package and a Chrome or Chromium)"
        )
    write_plotly_js(path.parent)
    page = figure.to_html(include_plotlyjs=False, include_mathjax=False, full_html=True, config=FIGURE_CONFIG)
    page = page.replace("</head>", f'<script src="{PLOTLY_JS}"></script>\n</head>', 1)
    path.write_text(page, encoding="utf-8")
    return path


def _version_line(bundle: str) -> str:
    # the bundle opens with a banner naming its version ("* plotly.js v4.1.1")
    start = bundle.find("plotly.js v")
    return bundle[start : start + 24] if start >= 0 else f"unknown {plotly.__version__}"


__all__ = ["PLOTLY_JS", "save_figure", "write_plotly_js"]
