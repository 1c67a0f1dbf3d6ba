"""What a study stage hands back, and what a run folder gives back for a finished stage.

A stage returns tables, figures (each with a paragraph on how to read it), tensor files, small
JSON results, summary lines, and `result`: the in-memory object later stages build on (a probe
sweep, say). Everything but `result` is written to the run folder; a stage that others depend
on rebuilds `result` from its `StoredOutput` when a resumed run skips it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from torch import Tensor


@dataclass
class StageFigure:
    """A figure and the paragraph that tells a reader what to look at."""

    figure: Any  # plotly.graph_objects.Figure
    how_to_read: str
    title: str | None = None  # the report section's title (default: the figure's own)
    table: str | None = None  # a table of the same stage shown under the figure in the report
    notes: str = ""


@dataclass
class StageOutput:
    """What a stage returns: tables, figures, tensors and data to write, headline lines, and its in-memory result."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, StageFigure | tuple[Any, str]] = field(default_factory=dict)
    tensors: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # one safetensors file each
    data: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable, one file each
    summary: list[str] = field(default_factory=list)  # headline lines for the end of the run and the report
    result: Any = None  # kept in memory for dependent stages, never written

    def figure_entries(self) -> dict[str, StageFigure]:
        return {name: entry if isinstance(entry, StageFigure) else StageFigure(*entry)
                for name, entry in self.figures.items()}


@dataclass
class StoredOutput:
    """A finished stage read back from its run folder (figures stay on disk until asked for)."""

    unit: str
    record: dict[str, Any]  # the completion record: timings, files and their hashes, figure texts
    tables: dict[str, pd.DataFrame]
    tensors: dict[str, dict[str, Tensor]]
    data: dict[str, Any]

    @property
    def summary(self) -> list[str]:
        return list(self.record.get("summary", []))
