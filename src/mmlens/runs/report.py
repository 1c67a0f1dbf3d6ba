"""The study report, rebuilt from a run folder alone (figures saved as plotly JSON, tables as parquet).

First the run's findings (every stage's headline lines, worded from its own intervals, each
shown once), then one section per saved figure, in run order, with its how-to-read paragraph,
the table the stage named for it and the figure's own notes; the run's config, hash, versions
and timings go in the metadata. No model is loaded, so `mmlens report RUN_DIR` is instant. Before anything is
rendered every file of every finished stage (tables, tensors, figures, data, each `done.json`)
is checked against its recorded sha256 and the manifest against its own, so an edited number
never reaches the page: the report is refused with the files named.
"""

from __future__ import annotations

from pathlib import Path

from .disk_errors import disk_errors
from .folder import RunFolder

REPORT_NAME = "report.html"


FINDINGS_NOTE = ("Each line is computed from this run's own 95% bootstrap intervals: an effect whose interval "
                 "includes zero is called not distinguishable from zero, and a ratio over such an effect is withheld.")


SEEDS_HOW_TO_READ = ("Each seed draws its own train/test split, folds and control tokens. The value is the mean of "
                     "the seeds' estimates; the interval pools the seeds' bootstrap distributions, so it covers the "
                     "spread of images within a split and the spread of estimates between splits and fits.")


def combined_summary(folder: RunFolder | str | Path):
    """The probe sweep's summary with every finished seed combined (`mmlens.probing.combine_seeds`),
    or None when fewer than two seeds have finished it."""
    from ..probing.seeds import combine_seeds

    if not isinstance(folder, RunFolder):
        folder = RunFolder.open(folder)
    samples = {}
    for unit in folder.done_units():
        record = folder.record(unit)
        if unit.startswith("probe_sweep/") and "tables/summary_samples.parquet" in record.get("files", {}):
            samples[int(record["seed"])] = folder.table(unit, "summary_samples")
    return combine_seeds(samples) if len(samples) > 1 else None


def report_sections(folder: RunFolder) -> list:
    from ..probing.seeds import combined_findings
    from ..viz.report import ReportSection

    folder.check()
    units = folder.done_units()
    seeds = {folder.record(u).get("seed") for u in units}
    sections = []
    # every finding once, here: the figure sections below carry only their own notes
    findings = [f"{unit}: {line}" for unit in units for line in folder.record(unit)["summary"]]
    combined = combined_summary(folder)
    if combined is not None:
        findings = [f"probe_sweep, all seeds: {line}" for line in combined_findings(combined)] + findings
    findings = list(dict.fromkeys(findings))
    if findings:
        sections.append(ReportSection("Findings of this run", None, "", notes=FINDINGS_NOTE + "\n\n" + "\n".join(findings)))
    for unit in units:
        record = folder.record(unit)
        suffix = f" (seed {record.get('seed')})" if len(seeds) > 1 else ""
        for name, meta in record["figures"].items():
            table = None
            if meta.get("table"):
                table = folder.table(unit, meta["table"])
            notes = meta.get("notes") or ""
            figure = folder.figure(unit, name)
            title = (meta.get("title") or figure.layout.title.text or name) + suffix
            sections.append(ReportSection(title, figure, meta["how_to_read"], table=table, notes=notes))
    if combined is not None:
        sections.insert(1, ReportSection("Probe sweep, seeds combined", None, SEEDS_HOW_TO_READ,
                                         table=combined.reset_index()))
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
    # plotly.js beside the report: the run folder travels whole (tables, probes), and the page
    # is 4.8 MB lighter than with the library inlined
    target = Path(path) if path is not None else folder.path / REPORT_NAME
    with disk_errors(target.parent, f"writing the report {target.name} (the results themselves are kept)"):
        written = write_report(target, sections, title=title, metadata=report_metadata(folder), plotly_js="beside")
    return written, None
