"""Two run folders compared seed by seed: paired differences of their probe sweeps' summaries.

Both runs must have probed the same images (the same dataset section and seeds), which is what
makes the comparison paired. For each seed finished in both, the sweeps are rebuilt from disk
(no model is loaded) and compared with `mmlens.probing.compare_sweeps`; the comparison can be
written as an HTML report of its own.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import RunFolderError
from .folder import RunFolder
from .probe_stage import sweep_from_stored

COMPARE_HOW_TO_READ = (
    "Both runs scored the same held-out images. Each difference (first run minus second) is computed on the same "
    "bootstrap resamples of those images for both runs, so its 95% interval is the paired interval of the "
    "difference; two models differ only where that interval excludes zero, whatever each run's own intervals say."
)


def compare_runs(first: str | Path, second: str | Path, *, names: tuple[str, str] | None = None,
                 n_boot: int | None = None) -> dict[int, pd.DataFrame]:
    """Per seed finished in both runs, `compare_sweeps` of their probe sweeps."""
    from ..probing.compare import compare_sweeps

    folders = [RunFolder.open(path) for path in (first, second)]
    names = names or tuple(f.path.name for f in folders)
    configs = [f.manifest["config"] for f in folders]
    if configs[0]["dataset"] != configs[1]["dataset"]:
        raise RunFolderError(f"the runs used different datasets ({configs[0]['dataset']} and {configs[1]['dataset']}); "
                             "a paired comparison needs the same images: run both with one dataset section")
    seeds = [{int(u.split("seed-")[1]) for u in f.done_units() if u.startswith("probe_sweep/")} for f in folders]
    shared = sorted(seeds[0] & seeds[1])
    if not shared:
        raise RunFolderError(f"no seed has a finished probe sweep in both runs (seeds {sorted(seeds[0])} and "
                             f"{sorted(seeds[1])}); run both with the same seeds")
    out = {}
    for seed in shared:
        sweeps = [sweep_from_stored(f.load(f"probe_sweep/seed-{seed}"), None) for f in folders]
        out[seed] = compare_sweeps(*sweeps, names=names, n_boot=n_boot or configs[0]["n_boot"], seed=seed)
    return out


def write_comparison(tables: dict[int, pd.DataFrame], path: str | Path) -> Path:
    """The comparison as an HTML report: per seed, the table of differences and its sentences."""
    from ..probing.compare import comparison_findings
    from ..viz.report import ReportSection, write_report

    sections = [ReportSection(f"Paired differences, seed {seed}", None, COMPARE_HOW_TO_READ, table=table.reset_index(),
                              notes="\n".join(comparison_findings(table))) for seed, table in tables.items()]
    names = next(iter(tables.values())).attrs["names"]
    return write_report(path, sections, title=f"mmlens compare: {names[0]} vs {names[1]}",
                        metadata={"runs": names, "seeds": list(tables)}, plotly_js="inline")


__all__ = ["compare_runs", "write_comparison"]
