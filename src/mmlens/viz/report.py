"""One self-contained HTML report: figures, tables and the run's metadata in a single file.

Each section is a plotly figure (and/or a small table) preceded by a sentence on how to read
it. plotly.js is loaded once, either inlined in the page head (`plotly_js="inline"`: one file
that can be mailed alone) or from a `plotly.min.js` beside the report (`"beside"`: a 4.8 MB
lighter page, for run folders that travel whole); every figure only carries its data and a
`Plotly.newPlot` call, so the page opens offline from `file://`. Figures are drawn at the width
of their card (a figure's own fixed width would hide its right edge behind a scroll bar) and
stay stacked on a phone, where only side-by-side panels scroll inside their card. All
text is escaped; the file is written to a temporary sibling and moved into place, so a reader
never sees a half-written report.
"""

from __future__ import annotations

import datetime as _dt
import html
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import plotly
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from .files import FIGURE_CONFIG, PLOTLY_JS, write_plotly_js

MAX_TABLE_ROWS = 200
FIGURE_HEIGHT_PX = 480
MIN_PANEL_WIDTH_PX = 150  # a panel narrower than this runs its title into its neighbour's

_CSS = """
:root { --ink: #1f2933; --muted: #616e7c; --line: #e4e7eb; --accent: #1f77b4; --paper: #ffffff; --band: #f5f7fa; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--band); color: var(--ink);
       font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
header h1 { font-size: 1.8em; margin: 0.2em 0 0.1em; }
header p.generated { color: var(--muted); margin: 0 0 1.2em; }
section, nav.toc, .metadata { background: var(--paper); border: 1px solid var(--line); border-radius: 8px;
       padding: 16px 22px; margin: 0 0 22px; }
h2 { font-size: 1.3em; margin: 0.2em 0 0.5em; }
nav.toc ol { margin: 0.3em 0; padding-left: 1.4em; columns: 2; }
nav.toc a, a.top { color: var(--accent); text-decoration: none; }
nav.toc a:hover, a.top:hover { text-decoration: underline; }
p.how-to-read { margin: 0 0 0.8em; padding: 8px 12px; border-left: 4px solid var(--accent); background: #eef5fb; }
p.how-to-read strong { color: var(--accent); }
.notes p { color: var(--muted); margin: 0.6em 0 0; }
.figure { width: 100%; overflow-x: auto; }
.table-wrap { overflow-x: auto; margin: 0.6em 0; }
table { border-collapse: collapse; font-size: 0.88em; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: var(--band); font-weight: 600; }
table.data td, table.data th { white-space: nowrap; }
table.data .num { text-align: right; }
.metadata td { text-align: left; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; word-break: break-all; }
p.truncated { color: var(--muted); font-size: 0.88em; }
a.top { font-size: 0.85em; float: right; }
/* A phone: figures take the whole card width and stay stacked, nothing is wider than the screen
   (tables scroll inside their own box), and the cards give their margins back to the content. */
@media (max-width: 640px) {
  main { padding: 12px 8px 40px; }
  section, nav.toc, .metadata { padding: 10px 10px; margin-bottom: 14px; }
  header h1 { font-size: 1.4em; overflow-wrap: anywhere; }
  h2 { font-size: 1.15em; overflow-wrap: anywhere; }
  nav.toc ol { columns: 1; }
  .notes p, p.how-to-read { overflow-wrap: anywhere; }
}
"""


@dataclass
class ReportSection:
    """One part of a report: a figure and/or a table, with the sentence that says how to read it.

    `how_to_read` is shown right before the figure (required when there is a figure or a table);
    `notes` is free text shown after it (blank lines separate paragraphs, line breaks are kept).
    """

    title: str
    figure: go.Figure | None
    how_to_read: str
    table: pd.DataFrame | None = None
    notes: str = ""


PlotlyJs = Literal["inline", "beside"]


def write_report(path: str | os.PathLike, sections: Sequence[ReportSection], *, title: str,
                 metadata: Mapping[str, object], plotly_js: PlotlyJs = "inline") -> Path:
    """Write `sections` as one HTML file at `path` (atomically) and return its path.

    `metadata` (model, dataset, config hash, versions, timings, ...) is rendered as a table;
    nested mappings become dotted keys. Parent folders are created. `plotly_js="inline"` makes
    the file self-contained; `"beside"` writes `plotly.min.js` next to it and loads it from there.
    """
    page = render_report(sections, title=title, metadata=metadata, plotly_js=plotly_js)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if plotly_js == "beside":
        write_plotly_js(path.parent)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(page)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it private; a report is meant to be shared
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def render_report(sections: Sequence[ReportSection], *, title: str, metadata: Mapping[str, object],
                  plotly_js: PlotlyJs = "inline") -> str:
    """The report's HTML as a string (what `write_report` writes)."""
    if plotly_js not in ("inline", "beside"):
        raise ValueError(f"plotly_js must be 'inline' (in the page) or 'beside' ({PLOTLY_JS} next to it), got {plotly_js!r}")
    sections = _checked(sections)
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping (e.g. a dict of model, dataset, versions), got {type(metadata).__name__}")
    anchors = [f"section-{i + 1}-{_slug(s.title)}" for i, s in enumerate(sections)]
    toc = "".join(f'<li><a href="#{a}">{html.escape(s.title)}</a></li>' for s, a in zip(sections, anchors))
    toc += '<li><a href="#metadata">Run metadata</a></li>'
    body = "\n".join(_section_html(s, a, i + 1) for i, (s, a) in enumerate(zip(sections, anchors)))
    generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    library = (f'<script type="text/javascript">{get_plotlyjs()}</script>' if plotly_js == "inline"
               else f'<script type="text/javascript" src="{PLOTLY_JS}"></script>')
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="mmlens (plotly {html.escape(plotly.__version__)})">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
{library}
</head>
<body>
<main>
<header id="top"><h1>{html.escape(title)}</h1><p class="generated">Generated {html.escape(generated)} by mmlens.</p></header>
<nav class="toc"><h2>Contents</h2><ol>{toc}</ol></nav>
{body}
<div class="metadata" id="metadata"><a class="top" href="#top">top</a><h2>Run metadata</h2>{_metadata_html(metadata)}</div>
</main>
</body>
</html>
"""


def _checked(sections: Sequence[ReportSection]) -> list[ReportSection]:
    sections = list(sections)
    if not sections:
        raise ValueError("a report needs at least one ReportSection")
    for i, section in enumerate(sections):
        if not isinstance(section, ReportSection):
            raise TypeError(f"section {i} is a {type(section).__name__}; wrap it in ReportSection(title, figure, how_to_read)")
        where = f"section {i} ({section.title!r})"
        if not section.title.strip():
            raise ValueError(f"section {i} has an empty title")
        if section.figure is not None and not isinstance(section.figure, go.Figure):
            raise TypeError(f"{where}: figure must be a plotly.graph_objects.Figure or None, got {type(section.figure).__name__}")
        if section.table is not None and not isinstance(section.table, pd.DataFrame):
            raise TypeError(f"{where}: table must be a pandas.DataFrame or None, got {type(section.table).__name__}")
        if section.figure is None and section.table is None and not section.notes.strip():
            raise ValueError(f"{where} has no figure, table or notes; leave it out or give it content")
        if (section.figure is not None or section.table is not None) and not section.how_to_read.strip():
            raise ValueError(f"{where}: say in how_to_read, in one sentence, how to read its figure or table")
    return sections


def _section_html(section: ReportSection, anchor: str, number: int) -> str:
    parts = [f'<section id="{anchor}"><a class="top" href="#top">top</a><h2>{number}. {html.escape(section.title)}</h2>']
    if section.how_to_read.strip():
        parts.append(f'<p class="how-to-read"><strong>How to read it:</strong> {html.escape(section.how_to_read.strip())}</p>')
    if section.figure is not None:
        parts.append(f'<div class="figure">{_figure_html(section.figure, f"figure-{number}")}</div>')
    if section.table is not None:
        parts.append(_table_html(section.table))
    if section.notes.strip():
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", section.notes) if p.strip()]
        # Summaries are often one finding per line: keep their line breaks.
        parts.append('<div class="notes">' + "".join(f"<p>{html.escape(p).replace(chr(10), '<br>')}</p>" for p in paragraphs) + "</div>")
    parts.append("</section>")
    return "\n".join(parts)


def _figure_html(figure: go.Figure, div_id: str) -> str:
    # A fixed div id keeps the report deterministic; an explicit pixel height keeps the div from
    # collapsing to zero inside an auto-height section (plotly's fragment default is 100%).
    height = f"{figure.layout.height}px" if figure.layout.height else f"{FIGURE_HEIGHT_PX}px"
    fitted = go.Figure(figure)  # a copy: the caller's figure keeps its own width
    fitted.update_layout(width=None, autosize=True)
    legend = fitted.layout.legend
    if legend.orientation == "h" and legend.y is not None and legend.y < 0:
        # A legend hung below the plot grows as it wraps on a narrow screen and then covers the
        # axis title; pinned to the figure's bottom edge, plotly makes room for it instead.
        fitted.update_layout(legend=dict(yref="container", y=0, yanchor="bottom"))
    drawn = fitted.to_html(
        include_plotlyjs=False, include_mathjax=False, full_html=False, div_id=div_id,
        default_width="100%", default_height=height, config=FIGURE_CONFIG,
    )
    columns = _panel_columns(fitted)
    if columns < 2:
        return drawn
    # Side-by-side panels squeezed onto a phone would run their titles into each other: below
    # this width the figure scrolls sideways inside its card instead (the page itself never does).
    return f'<div class="panels" style="min-width: {columns * MIN_PANEL_WIDTH_PX}px">{drawn}</div>'


def _panel_columns(figure: go.Figure) -> int:
    """How many panels the figure puts side by side (distinct x-axis domains)."""
    domains = {tuple(axis.domain or (0, 1)) for axis in figure.select_xaxes()}
    return max(len(domains), 1)


def _table_html(table: pd.DataFrame) -> str:
    shown = table.head(MAX_TABLE_ROWS)
    if not isinstance(shown.index, pd.RangeIndex):
        shown = shown.reset_index()  # a meaningful index (e.g. "statistic") becomes the first column
    numeric = [pd.api.types.is_numeric_dtype(t) and not pd.api.types.is_bool_dtype(t) for t in shown.dtypes]
    align = ['class="num"' if n else 'class="text"' for n in numeric]
    head = "".join(f"<th {a}>{html.escape(_text(c))}</th>" for c, a in zip(shown.columns, align))
    body = "".join(
        "<tr>" + "".join(f"<td {a}>{html.escape(_cell(v))}</td>" for v, a in zip(row, align)) + "</tr>"
        for row in shown.itertuples(index=False, name=None)
    )
    note = ""
    if len(table) > len(shown):
        note = f'<p class="truncated">First {len(shown)} of {len(table)} rows; the full table is in the run folder.</p>'
    return f'<div class="table-wrap"><table class="data"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{note}'


def _cell(value: object) -> str:
    if pd.api.types.is_scalar(value) and pd.isna(value):  # None, NaN, NA and NaT read as blank
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return _text(value)


def _metadata_html(metadata: Mapping[str, object]) -> str:
    rows = _flatten(metadata)
    if not rows:
        return '<p class="truncated">No metadata was recorded for this run.</p>'
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<div class=\"table-wrap\"><table>{body}</table></div>"


def _flatten(metadata: Mapping[str, object], prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in metadata.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows.extend(_flatten(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple, set, frozenset)):
            rows.append((name, ", ".join(_text(v) for v in value)))
        else:
            rows.append((name, _text(value)))
    return rows


def _text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "section"
