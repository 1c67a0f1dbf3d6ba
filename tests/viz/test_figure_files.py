"""`save_figure` writes offline HTML pages and real PNG / SVG / PDF files (kaleido driving the
system Chromium), and refuses names that promise a format it does not write."""

from __future__ import annotations

import sys

import plotly.graph_objects as go
import pytest

from mmlens.errors import InputError
from test_report import require_chromium
from mmlens.viz import save_figure
from mmlens.viz.files import PLOTLY_JS, StaticExportError

MAGIC = {".png": (b"\x89PNG",), ".svg": (b"<svg", b"<?xml"), ".pdf": (b"%PDF",)}


def small_figure() -> go.Figure:
    return go.Figure(go.Scatter(y=[1, 3, 2]), layout=dict(width=200, height=150))


def require_exporter() -> None:
    pytest.importorskip("kaleido", reason='static export needs kaleido: pip install "mmlens[export]"')
    require_chromium()


@pytest.mark.parametrize("name", ["figure.jpeg", "figure.txt", "figure"])
def test_a_suffix_it_does_not_write_is_refused_naming_those_it_does(tmp_path, name):
    with pytest.raises(InputError, match=r"cannot write .*\.html, \.htm, \.png, \.svg, \.pdf"):
        save_figure(small_figure(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_an_html_page_loads_plotly_from_beside_it(tmp_path):
    path = save_figure(small_figure(), tmp_path / "curve.HTML")
    assert f'<script src="{PLOTLY_JS}"></script>' in path.read_text() and (tmp_path / PLOTLY_JS).is_file()


def test_png_svg_and_pdf_are_those_formats(tmp_path):
    require_exporter()
    figure = small_figure()
    for suffix, magic in MAGIC.items():
        path = save_figure(figure, tmp_path / f"curve{suffix}")
        head = path.read_bytes()[:16].lstrip()
        assert head.startswith(magic), f"{path.name} starts with {head!r}"
    # nothing but the three files: no HTML page, no plotly.min.js, no temporary left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.pdf", "curve.png", "curve.svg"]


def test_without_kaleido_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kaleido", None)  # import kaleido now raises ImportError
    with pytest.raises(StaticExportError, match=r'pip install "mmlens\[export\]"'):
        save_figure(small_figure(), tmp_path / "curve.png")
    assert list(tmp_path.iterdir()) == []


def test_without_a_chromium_the_error_says_what_to_install(tmp_path, monkeypatch):
    pytest.importorskip("kaleido")
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    with pytest.raises(StaticExportError, match=r"needs a Chrome or Chromium.*apt-get install chromium"):
        save_figure(small_figure(), tmp_path / "curve.svg")
    assert list(tmp_path.iterdir()) == []
