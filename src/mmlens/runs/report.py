"""The study report, rebuilt from a run folder alone (figures saved as plotly JSON, tables as parquet).

One section per saved figure, in run order, with its how-to-read paragraph, the table the stage
named for it and the stage's headline numbers; the run's config, hash, versions and timings go
in the metadata. No model is loaded, so `mmlens report RUN_DIR` is instant; every file is checked
against the sha256 its stage recorded before it is rendered.
"""

from __future__ import annotations

from pathlib import Path

from .folder import RunFolder

REPORT_NAME = "report.html"


def report_sections(folder: RunFolder) -> list:
    from ..viz.report import ReportSection

    units = folder.done_units()
    seeds = {folder.record(u).get("seed") for u in units}
    sections = []
    for unit in units:
        record = folder.record(unit)
        suffix = f" (seed {record.get('seed')})" if len(seeds) > 1 else ""
        for name, meta in record["figures"].items():
            table = None
            if meta.get("table"):
                table = folder.table(unit, meta["table"])
            notes = "\n\n".join(part for part in (meta.get("notes") or "", "\n".join(record["summary"])) if part)
            figure = folder.figure(unit, name)
            title = (meta.get("title") or figure.layout.title.text or name) + suffix
            sections.append(ReportSection(title, figure, meta["how_to_read"], table=table, notes=notes))
    return sections


def report_metadata(folder: RunFolder) -> dict:
    manifest = folder.manifest
    config = manifest["config"]
    return {
        "model": config["model"],
        "dataset": {k: v for k, v in config["dataset"].items() if v is not None},
        "seeds": config["seeds"],
        "config sha256": manifest["config_sha256"],
        "run folder": str(folder.path.resolve()),
        "created": manifest["created"],
        "versions": manifest["versions"],
        "stage seconds": {unit: folder.record(unit)["seconds"] for unit in folder.done_units()},
    }


def build_report(folder: RunFolder, path: str | Path | None = None) -> tuple[Path | None, str | None]:
    """Write the report of every finished stage; returns (path, None) or (None, why not)."""
    from ..viz.report import write_report

    sections = report_sections(folder)
    if not sections:
        return None, "no stage has finished yet"
    title = f"mmlens study: {folder.manifest['config']['model']} on {folder.manifest['config']['dataset']['name']}"
    written = write_report(path or folder.path / REPORT_NAME, sections, title=title, metadata=report_metadata(folder))
    return written, None
