"""A run folder's results in Python, in one call: `mmlens.load_run(path)`.

Everything a finished study wrote that a researcher reads next: every finished unit's tables as
pandas DataFrames (each file checked against the sha256 its stage recorded, as the report does),
the findings the report opens with, the config the run was made with, each planned unit's status
and the report's path. Nothing is recomputed and no model is loaded; `RunResults.sweep(seed)`
rebuilds a probe sweep from disk when the objects themselves are wanted.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import RunFolderError
from .config import StudyConfig, config_from_dict
from .folder import MANIFEST, RunFolder
from .report import REPORT_NAME, combined_summary

COMBINED = "probe_sweep, all seeds"  # the findings key of the seeds combined, as the report words it


@dataclass(frozen=True)
class RunResults:
    """One run folder read back: `tables[unit][name]`, `findings[unit]` (the report's lines),
    `stages[unit]` ("done", "running", "failed" or "not started"), the `config` and the `report`
    (None until one is written). With several seeds, `findings` and `tables` also hold the seeds
    combined, under "probe_sweep, all seeds"."""

    path: Path
    config: StudyConfig
    config_sha256: str
    stages: dict[str, str]
    tables: dict[str, dict[str, pd.DataFrame]]
    findings: dict[str, list[str]]
    report: Path | None

    def table(self, name: str, unit: str | None = None) -> pd.DataFrame:
        """The table `name` of `unit`; without `unit`, of the one finished unit that has it."""
        owners = [u for u, tables in self.tables.items() if name in tables and (unit is None or u == unit)]
        if len(owners) == 1:
            return self.tables[owners[0]][name]
        if owners:
            raise RunFolderError(f"{len(owners)} units of {self.path} have a table {name!r} ({', '.join(owners)}); "
                                 f"name one: table({name!r}, unit={owners[0]!r})")
        known = sorted({t for u, tables in self.tables.items() if unit is None or u == unit for t in tables})
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        where = f"unit {unit!r} of {self.path}" if unit is not None else str(self.path)
        raise RunFolderError(f"{where} has no finished table {name!r}; {hint}tables: {', '.join(known) or 'none yet'}")

    def sweep(self, seed: int | None = None, dataset: Any = None, device: str = "cpu"):
        """The probe sweep of `seed` (default: the only finished one) rebuilt from disk, as
        `mmlens.probing.load_sweep` returns it; pass the run's dataset to draw prediction maps."""
        from .probe_stage import sweep_from_stored

        finished = [u for u, state in self.stages.items() if u.startswith("probe_sweep/") and state == "done"]
        if seed is not None:
            unit = f"probe_sweep/seed-{seed}"
            if unit not in finished:
                raise RunFolderError(f"{self.path} has no finished probe sweep for seed {seed}; "
                                     f"finished: {', '.join(finished) or 'none'}")
        elif len(finished) == 1:
            unit = finished[0]
        else:
            raise RunFolderError(f"{self.path} holds {len(finished)} finished probe sweeps "
                                 f"({', '.join(finished) or 'none'}); pick one with seed=N" if finished else
                                 f"{self.path} holds no finished probe sweep yet; run or resume the study first")
        return sweep_from_stored(RunFolder.open(self.path).load(unit), dataset, device)

    def __repr__(self) -> str:
        lines = [f"RunResults({str(self.path)!r}): {self.config.model} on {self.config.dataset.name}, "
                 f"config sha256 {self.config_sha256[:12]}"]
        combined = {COMBINED: "combined"} if COMBINED in self.findings else {}
        for unit, state in {**combined, **self.stages}.items():
            tables = ", ".join(self.tables.get(unit, {}))
            lines.append(f"  {unit}: {state}" + (f"; tables: {tables}" if tables else ""))
            lines += [f"    - {finding}" for finding in self.findings.get(unit, [])]
        lines.append(f"  report: {self.report}" if self.report else "  report: none yet (mmlens report RUN_DIR)")
        return "\n".join(lines)


def load_run(path: str | Path) -> RunResults:
    """The tables, findings, config and stage status of the run folder at `path`."""
    path = Path(path)
    if not path.is_dir():
        raise RunFolderError(f"{path} is not a folder; give the run folder `mmlens study` or `mmlens demo` wrote "
                             "(the one holding manifest.json)")
    if not (path / MANIFEST).is_file():
        below = sorted(str(p.parent) for p in path.glob(f"*/{MANIFEST}"))
        hint = (f"; run folders inside it: {', '.join(below)}" if below else
                "; run `mmlens study CONFIG --out DIR` or `mmlens demo` first")
        raise RunFolderError(f"{path} is not an mmlens run folder: it has no {MANIFEST}{hint}")
    folder = RunFolder.open(path)
    folder.check()  # every finished file as its stage wrote it, or refused with the files named
    stages = {unit: _status(folder, unit) for unit in folder.manifest["unit_keys"]}
    tables, findings = {}, {}
    for unit in folder.done_units():
        record = folder.record(unit)
        names = [f.removeprefix("tables/").removesuffix(".parquet") for f in record["files"] if f.startswith("tables/")]
        tables[unit] = {name: folder.table(unit, name) for name in names}
        findings[unit] = list(dict.fromkeys(record.get("summary", [])))
    combined = combined_summary(folder)
    if combined is not None:
        from ..probing.seeds import combined_findings

        findings = {COMBINED: combined_findings(combined), **findings}
        tables[COMBINED] = {"summary": combined}
    report = path / REPORT_NAME
    return RunResults(path=path, config=config_from_dict(folder.manifest["config"], source=str(path / MANIFEST)),
                      config_sha256=folder.config_sha256, stages=stages, tables=tables, findings=findings,
                      report=report if report.is_file() else None)


def _status(folder: RunFolder, unit: str) -> str:
    if folder.is_done(unit):
        return "done"
    state = folder.manifest["stages"].get(unit, {}).get("status")
    return state if state in ("running", "failed") else "not started"


__all__ = ["RunResults", "load_run"]
