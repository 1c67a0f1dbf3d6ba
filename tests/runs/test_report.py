"""The self-contained HTML report: structure, escaping, atomic writes, and real rendering in Chromium.

The browser tests load the report from file:// in headless Chromium with every host name
unresolvable and check that each figure's div holds a rendered plotly SVG and that a screenshot
is not blank. Without Chromium they skip, unless CI is set, where they fail.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from mmlens.data import load_segmentation
from mmlens.interventions import bidirectional_image_attention
from mmlens.probing import probe_sweep
from mmlens.testing.browser import BrowserError, drawn_fraction, dump_dom, find_chromium, rendered_figures, screenshot
from mmlens.viz import plot_attention_mask, plot_probe_curve, plot_probe_predictions
from mmlens.viz.report import ReportSection, render_report, write_report

HOSTILE = '<script>alert("x")</script> & "quotes"'
EXTERNAL_REFERENCE = re.compile(r"""<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.I)


def require_chromium() -> None:
    if find_chromium() is not None:
        return
    if os.environ.get("CI"):
        pytest.fail("CI is set but Chromium is missing: the report must be checked in a real browser "
                    "(apt-get install chromium, or set MMLENS_CHROMIUM)")
    pytest.skip("Chromium is not installed (apt-get install chromium); set CI=1 to make this a failure")


@pytest.fixture(scope="module")
def sweep(tiny_clip):
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)
    return probe_sweep(tiny_clip.model, scenes, probe="ridge", control=["shuffled_labels"],
                       batch_size=8, progress=False, n_boot=1000)


@pytest.fixture(scope="module")
def sections(sweep, tiny_clip):
    mask = bidirectional_image_attention(tiny_clip.model, tiny_clip.inputs).effective_mask()
    return [
        ReportSection("Drop-off and recovery", plot_probe_curve(sweep),
                      "Each point is a probe's held-out mIoU at one site, left to right along the pipeline; the band is a 95% bootstrap interval.",
                      table=sweep.summary(), notes=f"Notes with {HOSTILE}.\n\nA second paragraph,\nin two lines."),
        ReportSection("Probe predictions", plot_probe_predictions(sweep, example=0),
                      "Each panel paints every token's predicted class over its pixels, beside the image and the truth."),
        ReportSection(f"Attention mask {HOSTILE}", plot_attention_mask(mask, row=0, inputs=tiny_clip.inputs),
                      "Blue cells are query -> key edges the model may use; the red box is the image tokens."),
        ReportSection("Probe table", None, "One row per site and condition.", table=sweep.table),
    ]


METADATA = {"model": "tiny-clip", "dataset": "scenes/validation (24)", "config_hash": "abc123",
            "versions": {"mmlens": "0.1.0", "torch": "2.x"}, "timings_s": {"probe_sweep": 1.25}, "layers": [0, 1],
            "hostile": HOSTILE}


@pytest.fixture(scope="module")
def report(sections, tmp_path_factory):
    return write_report(tmp_path_factory.mktemp("report") / "sub" / "report.html", sections,
                        title=f"Study {HOSTILE}", metadata=METADATA)


def test_report_is_one_self_contained_file(report, sections):
    page = report.read_text(encoding="utf-8")
    n_figures = sum(s.figure is not None for s in sections)
    assert page.count("* plotly.js v") == 1                              # the library, inlined once
    assert page.count('class="plotly-graph-div"') == n_figures
    assert page.count("Plotly.newPlot(") == n_figures
    assert not EXTERNAL_REFERENCE.search(page), EXTERNAL_REFERENCE.search(page)
    assert "MathJax" not in page.split("* plotly.js v")[0]               # no MathJax loader before the library
    assert "<script src" not in page and "<link" not in page
    assert oct(report.stat().st_mode & 0o777) == oct(0o644)


def test_contents_how_to_read_tables_and_metadata(report, sections, sweep):
    page = report.read_text(encoding="utf-8")
    anchors = re.findall(r'<section id="([^"]+)"', page)
    assert len(anchors) == len(sections)
    for anchor in anchors:
        assert f'href="#{anchor}"' in page                               # the table of contents links every section
    for i, section in enumerate(sections, start=1):
        explained = page.index(_escaped(section.how_to_read))
        if section.figure is not None:
            assert explained < page.index(f'id="figure-{i}"')            # the sentence comes before its figure
    tables = page.split('id="metadata"')[0].count('<table class="data">')
    assert tables == 2                                                   # summary and probe table
    assert page.count("<tr>") >= len(sweep.table) + len(sweep.summary())
    assert '<th class="text">statistic</th>' in page                   # a named index is kept as a column
    assert '<td class="text">model</td>' in page and '<td class="text">shuffled_labels</td>' in page
    miou = sweep.table.miou.iloc[0]
    assert f'<td class="num">{miou:.4g}</td>' in page
    assert "<p>A second paragraph,<br>in two lines.</p>" in page
    metadata = page.split('id="metadata"')[1]
    for key in ("model", "dataset", "config_hash", "versions.mmlens", "versions.torch", "timings_s.probe_sweep"):
        assert f"<th>{key}</th>" in metadata
    assert "<td>0, 1</td>" in metadata and "<td>1.25</td>" in metadata


def test_all_text_is_escaped(report):
    page = report.read_text(encoding="utf-8")
    assert '<script>alert("x")</script>' not in page
    assert page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") >= 4  # title, heading, toc, notes, metadata


def test_write_is_atomic(tmp_path, sections):
    target = tmp_path / "report.html"
    target.write_text("previous report")
    with pytest.raises(ValueError, match="how_to_read"):
        write_report(target, [*sections[:1], ReportSection("x", go.Figure(), "  ")], title="t", metadata={})
    assert target.read_text() == "previous report"                       # a failed render leaves the old file
    write_report(target, sections[:1], title="t", metadata={})
    assert "plotly-graph-div" in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]        # no temporary file left behind


def test_bad_sections_are_explained():
    figure = go.Figure()
    with pytest.raises(ValueError, match="at least one"):
        render_report([], title="t", metadata={})
    with pytest.raises(TypeError, match="wrap it in ReportSection"):
        render_report([figure], title="t", metadata={})
    with pytest.raises(TypeError, match="plotly.graph_objects.Figure"):
        render_report([ReportSection("a", {"data": []}, "read it")], title="t", metadata={})
    with pytest.raises(ValueError, match="no figure, table or notes"):
        render_report([ReportSection("a", None, "")], title="t", metadata={})
    with pytest.raises(TypeError, match="metadata must be a mapping"):
        render_report([ReportSection("a", figure, "read it")], title="t", metadata=[("model", "x")])


def test_long_tables_are_cut_with_a_note():
    table = pd.DataFrame({"value": range(500), "x": np.float32(0.123456), "name": None})
    page = render_report([ReportSection("long", None, "Rows are sites.", table=table)], title="t", metadata={})
    assert "First 200 of 500 rows" in page and '<td class="num">199</td>' in page and '<td class="num">200</td>' not in page
    assert '<td class="num">0.1235</td>' in page and '<td class="text"></td>' in page


def test_figure_counter_reads_nested_dom():
    dom = ('<html><body><div id="a" class="plotly-graph-div js-plotly-plot"><div><svg class="main-svg"><g></g></svg>'
           '<br><svg class="main-svg"/></div></div><div class="plotly-graph-div" id="b"><img src="x"></div>'
           '<svg class="main-svg"></svg></body></html>')
    assert rendered_figures(dom) == {"a": 2, "b": 0}


def test_missing_chromium_skips_locally_and_fails_in_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("MMLENS_CHROMIUM", str(tmp_path / "no-such-browser"))
    assert find_chromium() is None
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="CI=1"):
        require_chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set but Chromium is missing"):
        require_chromium()
    with pytest.raises(BrowserError, match="no Chromium found"):
        dump_dom(tmp_path / "report.html")


def test_report_renders_in_chromium(report, sections, tmp_path):
    require_chromium()
    figures = rendered_figures(dump_dom(report))
    expected = [f"figure-{i}" for i, s in enumerate(sections, start=1) if s.figure is not None]
    assert sorted(figures) == expected
    assert all(n >= 1 for n in figures.values()), figures               # every figure drew its SVG
    png = screenshot(report, tmp_path / "report.png", width=1280, height=2400)
    assert drawn_fraction(png) > 0.05                                    # not a blank page


def test_chromium_check_fails_for_a_page_that_needs_the_network(tmp_path):
    require_chromium()
    div = go.Figure(go.Scatter(y=[1, 3, 2])).to_html(include_plotlyjs="cdn", full_html=True, div_id="online")
    page = tmp_path / "online.html"
    page.write_text(div)
    assert rendered_figures(dump_dom(page)) == {"online": 0}            # the CDN is unreachable by design


def _escaped(text: str) -> str:
    import html

    return html.escape(text)


def test_wide_figures_fit_their_card_at_1280_px(tmp_path):
    """A figure with its own fixed width (the position heatmap is 200 px per site) is drawn at the
    width of its card, so its last panels and colour bar are not hidden behind a scroll bar."""
    require_chromium()
    wide = go.Figure(go.Heatmap(z=np.arange(60).reshape(3, 20), colorbar=dict(title="accuracy")))
    wide.update_layout(width=1600, height=300, title="wide")
    page = write_report(tmp_path / "report.html", [ReportSection("Wide", wide, "Cells are numbers.")],
                        title="t", metadata={})
    assert wide.layout.width == 1600                                     # the caller's figure is untouched
    dom = dump_dom(page, virtual_time_ms=5_000)
    figure = dom.split('id="figure-1"')[1]
    widths = [float(w) for w in re.findall(r'<svg class="main-svg"[^>]*?\swidth="([\d.]+)"', figure)]
    assert widths and max(widths) <= 1180 - 2 * 28 - 2 * 22, widths      # main's max width less paddings
    assert "accuracy" in figure                                          # the colour bar is drawn


def test_report_reflows_on_a_phone(report, tmp_path):
    """At 390 px (a phone) the figures are stacked at the width of their card, side-by-side panels
    scroll inside their card, nothing makes the page scroll sideways, and a legend below a plot
    does not cover its axis title; at 1280 px no figure is wider than its card."""
    require_chromium()
    from mmlens.testing.page_layout import measure_layout

    for width in (1280, 390):
        layout = measure_layout(report, width)
        assert layout.viewport == width and not layout.overflows, (width, layout.scroll_width)
        assert len(layout.boxes) == 3 and layout.overlapping() == [], layout.overlapping()
        tops = [box.top for box in layout.boxes]
        assert tops == sorted(tops)                                           # stacked, in section order
        curve, predictions, mask = layout.boxes
        assert curve.width == mask.width and curve.left == mask.left            # one-panel figures: the card's width
        assert curve.width >= (min(width, 1180) - 2 * 28 - 2 * 22 - 2 if width > 640 else width - 2 * 8 - 2 * 10 - 2)
        assert predictions.width >= 4 * 150                                     # 4 panels, none squeezed
    phone = measure_layout(report, 390, selector="#figure-1 .legend, #figure-1 .g-xtitle")
    legend, axis_title = phone.boxes
    assert legend.height > 0 and axis_title.height > 0 and legend.overlap(axis_title) == 0
