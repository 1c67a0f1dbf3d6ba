"""How a result object shows itself in a notebook (`_repr_html_`): its findings, then its tables.

A result's own sentences come first (worded from its intervals, see `mmlens.findings`), then
its headline tables, each cut to a few rows; the rows a finding is about are never the ones cut:
they come first, highlighted, whatever the table's length. Figures stay one call away
(`result.figure()`, `mmlens.viz`), so displaying a result never embeds 4.8 MB of plotly.js.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import InputError

MAX_ROWS = 12
FOCUS_STYLE = "background:#fff3bf"


def result_html(title: str, findings: Sequence[str], tables: Mapping[str, pd.DataFrame], hint: str = "",
                focus: Mapping[str, Sequence[bool]] | None = None) -> str:
    """An HTML block: a heading, one paragraph per finding, then each table (first rows only).

    `focus` maps a table's name to a boolean mask of its rows (a Series or array as long as the
    table): the rows the findings name. Those are shown first and highlighted, all of them, and
    the table's other rows fill up to `MAX_ROWS`.
    """
    focus = dict(focus or {})
    unknown = sorted(set(focus) - set(tables))
    if unknown:
        raise InputError(f"focus names {unknown}, which are not tables of this result; tables: {sorted(tables)}")
    parts = [f"<div class=\"mmlens-result\"><h4 style=\"margin:0.2em 0\">{html.escape(title)}</h4>"]
    if findings:
        parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in findings) + "</ul>")
    for name, table in tables.items():
        parts.append(_table_html(name, table, focus.get(name)))
    if hint:
        parts.append(f"<p style=\"color:#616e7c\">{html.escape(hint)}</p>")
    parts.append("</div>")
    return "".join(parts)


def _table_html(name: str, table: pd.DataFrame, focus: Sequence[bool] | None) -> str:
    named = np.zeros(len(table), dtype=bool) if focus is None else np.asarray(focus, dtype=bool)
    if named.shape != (len(table),):
        raise InputError(f"focus for table {name!r} must have one entry per row ({len(table)}), got shape {named.shape}")
    n_named = int(named.sum())
    rest = table[~named].head(max(MAX_ROWS - n_named, 0))
    shown = pd.concat([table[named], rest])
    notes = []
    if n_named:
        notes.append(f"the {n_named} row{'s' if n_named > 1 else ''} the findings name first, highlighted")
    if len(shown) < len(table):
        notes.append(f"{'' if n_named else 'first '}{len(shown)} of {len(table)} rows")
    caption = f" ({'; '.join(notes)})" if notes else ""
    rendered = shown.to_html(float_format=lambda x: f"{x:.4g}", na_rep="", border=0)
    head, body = rendered.split("<tbody>", 1)
    body = body.replace("<tr>", f"<tr style=\"{FOCUS_STYLE}\">", n_named)  # pandas writes body rows as plain <tr>
    return (f"<p style=\"margin:0.6em 0 0.2em\"><b>{html.escape(name)}</b>{html.escape(caption)}</p>"
            f"{head}<tbody>{body}")


__all__ = ["result_html"]
