"""The documentation site works opened from disk, and every figure it shows opens offline.

The site is built with `mkdocs build --strict` (as `make docs` does); then every relative link
and embedded source of every page must name a file that exists in the built site (a link to a
folder shows a directory listing from file://, not a page), and each page of `docs/figures/` is
loaded in headless Chromium without network and must draw its plotly figure. The API reference
must hold every public name with its docstring, and search must work from disk.
"""

from __future__ import annotations

import html
import importlib
import inspect
import json
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
        if not target.strip():  # src="": mkdocs-jupyter's MathJax turned off; an empty src loads nothing
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


# Every package and module a user imports names from; each name in its __all__ needs an API entry.
PUBLIC_MODULES = ("mmlens", "mmlens.model", "mmlens.experiments", "mmlens.interventions", "mmlens.probing",
                  "mmlens.data", "mmlens.viz", "mmlens.sae", "mmlens.runs", "mmlens.errors", "mmlens.findings",
                  "mmlens.resampling", "mmlens.distributed", "mmlens.placement")
API_HEADING = re.compile(r'<h\d id="(mmlens[^"]*)" class="doc doc-heading"')
SIGNATURE = re.compile(r'<div class="doc-signature[^"]*">(.*?)</div>', re.S)


def visible_text(markup: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", markup)).split())


def api_entries(site: Path) -> dict[str, tuple[str, str]]:
    """Anchor id -> (rendered docstring, rendered signature) of every mkdocstrings entry."""
    entries = {}
    for page in sorted((site / "api").glob("*.html")):
        text = page.read_text(encoding="utf-8")
        headings = list(API_HEADING.finditer(text))
        for heading, following in zip(headings, headings[1:] + [None]):
            body = text[heading.end():following.start() if following else len(text)]
            signature = SIGNATURE.search(body)
            contents = body.split('class="doc doc-contents', 1)
            docstring = visible_text(contents[1].split(">", 1)[1]) if len(contents) == 2 else ""
            entries[heading.group(1)] = (docstring, visible_text(signature.group(1)) if signature else "")
    return entries


def entry_ids(name: str, obj, modules: dict) -> set[str]:
    """Where an entry for `obj` may sit: under any public module that exports it, or at its definition
    (a function that shares its name with its module is documented by its full path)."""
    ids = {f"{path}.{name}" for path, module in modules.items() if getattr(module, name, None) is obj}
    if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__.startswith("mmlens"):
        ids.add(f"{obj.__module__}.{obj.__qualname__}")
    if inspect.ismodule(obj):
        ids.add(obj.__name__)
    return ids


def test_api_reference_documents_every_public_name(site):
    modules = {path: importlib.import_module(path) for path in PUBLIC_MODULES}
    entries = api_entries(site)
    missing, undocumented = [], []
    for path, module in modules.items():
        for name in module.__all__:
            if name.startswith("__"):  # __version__: package metadata, not an API
                continue
            obj = getattr(module, name)
            found = [entries[anchor] for anchor in entry_ids(name, obj, modules) if anchor in entries]
            # functions, classes and modules show their docstring; a constant shows its value
            is_constant = not (callable(obj) or inspect.ismodule(obj))
            if not found:
                missing.append(f"{path}.{name}")
            elif not any(docstring or (is_constant and signature) for docstring, signature in found):
                undocumented.append(f"{path}.{name}")
    assert not missing, f"public names with no entry in the API reference (docs/api/*.md): {missing}"
    assert not undocumented, f"API entries rendered without a docstring: {undocumented}"


def test_api_reference_renders_names_shadowed_by_their_modules(site):
    entries = api_entries(site)
    for anchor in ("mmlens.experiments.anchor_knockout.anchor_knockout",
                   "mmlens.experiments.position_study.position_study",
                   "mmlens.interventions.knockout.knockout", "mmlens.probing.token_labels.token_labels"):
        docstring, signature = entries[anchor]
        assert docstring and signature.startswith(anchor.rsplit(".", 1)[1] + "("), (anchor, signature)


def test_search_works_from_disk(site):
    """Material's offline plugin: from file:// the page loads the index as a script, not by fetch,
    and the search worker runs through a shim shipped with the site (no CDN)."""
    index = (site / "search" / "search_index.js").read_text(encoding="utf-8")
    assert index.startswith("var __index = ")
    documents = json.loads(index.removeprefix("var __index = "))["docs"]
    assert any(doc["location"].startswith("probing.html") for doc in documents)
    page = (site / "index.html").read_text(encoding="utf-8")
    shims = re.findall(r'<script src="([^"]*iframe-worker[^"]*)"', page)
    assert shims and all(not urlsplit(src).scheme for src in shims), shims
    assert all((site / src).is_file() for src in shims)


def test_search_finds_pages_when_the_site_is_opened_from_disk(site, tmp_path):
    require_chromium()
    # Material runs the search in a page's ?q= on load; a file:// path cannot carry a query, so a
    # page beside index.html opens it with one (the shim must start the worker from disk)
    opener = site / "open_search.html"
    opener.write_text('<!doctype html><script>location.replace("index.html?q=recovery")</script>', encoding="utf-8")
    try:
        dom = dump_dom(opener)
    finally:
        opener.unlink()
    found = re.search(r'class="md-search-result__meta">\s*(\d+) matching document', dom)
    assert found and int(found.group(1)) > 0, "search from file:// found nothing: is the worker shim loaded?"
    assert re.search(r'href="[^"]*/patching\.html[^"]*" class="md-search-result__link"', dom)


# Appended to a copy of a page: each embedded figure's frame as laid out, written into the DOM
MEASURE_FRAMES = ('<script>window.addEventListener("load", () => { document.body.dataset.frames = JSON.stringify('
                  '[...document.querySelectorAll("iframe[src]")].map(f => [f.getAttribute("src"), f.clientWidth, '
                  'f.clientHeight])); });</script>')


def frame_sizes(page: Path, width: int) -> list[tuple[str, int, int]]:
    """(src, width, height) of every iframe of `page` laid out in a window `width` CSS pixels wide."""
    copy = page.with_name(f"measure_{page.name}")
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", MEASURE_FRAMES + "</body>"), encoding="utf-8")
    try:
        dom = dump_dom(copy, window=(width, 900))
    finally:
        copy.unlink()
    found = re.search(r'data-frames="([^"]*)"', dom)
    assert found, f"{page.name}: the measuring script did not run"
    return [tuple(frame) for frame in json.loads(html.unescape(found.group(1)))]


def figure_layout(page: Path) -> dict:
    """The plotly layout a figure page passes to Plotly.newPlot(div, data, layout, config)."""
    text = page.read_text(encoding="utf-8")
    decoder, at = json.JSONDecoder(), text.index("Plotly.newPlot(") + len("Plotly.newPlot(")
    parts = []
    for _ in range(3):  # the div's id, the traces, the layout
        at = len(text) - len(text[at:].lstrip(" \n,"))
        value, at = decoder.raw_decode(text, at)
        parts.append(value)
    return parts[2]


def test_embedded_figures_fit_their_frames_at_desktop_width(site):
    """A figure of fixed size wider or taller than its frame is cut off (its legend, its last panels)."""
    require_chromium()
    checked, clipped = 0, []
    for page in sorted(site.glob("*.html")):
        if "<iframe src=" not in page.read_text(encoding="utf-8"):
            continue
        for src, width, height in frame_sizes(page, 1280):
            layout = figure_layout(page.parent / src)
            checked += 1
            if layout.get("width", 0) > width or layout.get("height", 0) > height:
                clipped.append(f"{page.name}: {src} is {layout.get('width', 'auto')} x {layout.get('height', 'auto')} "
                               f"px in a {width} x {height} frame")
    assert checked >= 6
    assert not clipped, clipped


def test_tutorial_notebook_is_a_page_with_its_figures(site):
    """mkdocs-jupyter renders the stored outputs; their figures draw with the site's plotly.js, offline."""
    page = site / "tutorial.html"
    text = page.read_text(encoding="utf-8")
    assert "The probe curve along the pipeline" in text and "probe mIoU at the adapter output" in text
    assert 'href="tutorial.html"' in (site / "index.html").read_text(encoding="utf-8")  # in the nav
    require_chromium()
    drawn = rendered_figures(dump_dom(page))
    assert len(drawn) == 6 and all(n >= 1 for n in drawn.values()), drawn
