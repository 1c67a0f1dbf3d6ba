"""How a result object shows itself in a notebook (`_repr_html_`): its findings, then its tables.

A result's own sentences come first (worded from its intervals, see `mmlens.findings`), then
its headline tables, each cut to a few rows; figures stay one call away (`result.figure()`,
`mmlens.viz`), so displaying a result never embeds 4.8 MB of plotly.js in a notebook.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import pandas as pd

MAX_ROWS = 12


def result_html(title: str, findings: Sequence[str], tables: Mapping[str, pd.DataFrame], hint: str = "") -> str:
    """An HTML block: a heading, one paragraph per finding, then each table (first rows only)."""
    parts = [f"<div class=\"mmlens-result\"><h4 style=\"margin:0.2em 0\">{html.escape(title)}</h4>"]
    if findings:
        parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in findings) + "</ul>")
    for name, table in tables.items():
        shown = table.head(MAX_ROWS)
        more = f" (first {MAX_ROWS} of {len(table)} rows)" if len(table) > MAX_ROWS else ""
        parts.append(f"<p style=\"margin:0.6em 0 0.2em\"><b>{html.escape(name)}</b>{html.escape(more)}</p>")
        parts.append(shown.to_html(float_format=lambda x: f"{x:.4g}", na_rep="", border=0))
    if hint:
        parts.append(f"<p style=\"color:#616e7c\">{html.escape(hint)}</p>")
    parts.append("</div>")
    return "".join(parts)


__all__ = ["result_html"]
