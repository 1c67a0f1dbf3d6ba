"""The documentation site works opened from disk, and every figure it shows opens offline.

The site is built with `mkdocs build --strict` (as `make docs` does); then every relative link
and embedded source of every page must name a file that exists in the built site (a link to a
folder shows a directory listing from file://, not a page), and each page of `docs/figures/` is
loaded in headless Chromium without network and must draw its plotly figure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from mmlens.testing.browser import dump_dom, rendered_figures
from test_report import require_chromium

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
REFERENCE = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def local_references(page: Path) -> list[str]:
    found = []
    for target in REFERENCE.findall(page.read_text(encoding="utf-8")):
        parts = urlsplit(target)
        if parts.scheme or parts.netloc or target.startswith(("#", "mailto:", "data:", "javascript:")):
            continue
        found.append(unquote(parts.path))
    return found


def test_every_page_link_works_from_disk(site):
    pages = sorted(site.rglob("*.html"))
    assert (site / "index.html").is_file() and (site / "quickstart.html").is_file() and len(pages) > 15
    broken, folders = [], []
    for page in pages:
        if page.parent.name == "figures" or page.name == "404.html":  # the 404 page is only ever served
            continue
        for target in local_references(page):
            resolved = (page.parent / target).resolve()
            if target.endswith("/") or resolved.is_dir():
                folders.append(f"{page.relative_to(site)} -> {target}")
            elif not resolved.is_file():
                broken.append(f"{page.relative_to(site)} -> {target}")
    assert not folders, f"links to folders show directory listings from disk: {folders[:10]}"
    assert not broken, f"links to missing files: {broken[:10]}"


def test_guides_embed_their_key_figures(site):
    embedded = {page.name: re.findall(r'<iframe src="figures/([^"]+)"', page.read_text(encoding="utf-8"))
                for page in (site / "probing.html", site / "patching.html", site / "interventions.html")}
    assert "demo_probe_curve.html" in embedded["probing.html"]
    assert "demo_head_heatmap.html" in embedded["patching.html"]
    assert any(name.startswith("position_heatmap") for name in embedded["interventions.html"])
    for names in embedded.values():
        assert all((site / "figures" / name).is_file() for name in names)


def test_docs_figures_open_offline_and_share_one_plotly():
    require_chromium()
    pages = sorted(FIGURES.glob("*.html"))
    assert pages
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert "* plotly.js v" not in text, f"{page.name} inlines plotly.js; load the folder's plotly.min.js"
        assert 'src="plotly.min.js"' in text, page.name
        figures = rendered_figures(dump_dom(page))
        assert figures and all(n >= 1 for n in figures.values()), (page.name, figures)
