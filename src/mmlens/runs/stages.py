"""Study stages and the resumable driver that runs them into a run folder.

A stage is a named function from a `StageContext` (config, seed, the model and dataset loaded
once per run, the results of the stages it depends on) to a `StageOutput`. `run_study` expands
the enabled stages over the config's seeds into units ("probe_sweep/seed-0"), skips units whose
completion record exists, and for a skipped unit that others depend on rebuilds its in-memory
result from disk with the stage's `restore`. Global random generators are reseeded before each
unit, so a unit computes the same numbers whether it runs after its dependencies in one process
or alone in a resumed one.

A finished unit is skipped only while its files are the ones it wrote (`RunFolder.check`): a
resume with an edited, truncated or removed result stops before the first unit, names each file
and gives the `--rerun` command that rebuilds it. Refusing, rather than quietly recomputing,
tells the researcher something outside mmlens touched their results, and costs one command.

A unit is reused only while its key holds: the hash of the config sections its stage reads
(`config_sections`, plus the sections every stage reads), its seed and its dependencies' keys.
Fixing one section of a config therefore reruns the stages that read it and keeps the rest.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from ..progress import note, progress_bar

from .. import distributed
from ..errors import ConfigError, RunFolderError
from .config import StudyConfig
from .config_checks import device_problems, model_problems
from .folder import RunFolder, package_versions
from .outputs import StageOutput, StoredOutput


class Stage(Protocol):
    name: str
    title: str
    depends_on: tuple[str, ...]
    config_sections: tuple[str, ...]  # the StudyConfig sections it reads beyond SHARED_SECTIONS

    def enabled(self, config: StudyConfig) -> bool: ...

    def run(self, context: "StageContext") -> StageOutput: ...

    def restore(self, context: "StageContext", stored: StoredOutput) -> Any: ...


@dataclass(frozen=True)
class FunctionStage:
    """A stage made from a function; `restore` (default: the stored output itself) rebuilds the
    in-memory result that dependents receive from `context.result(name)`."""

    name: str
    title: str
    run_fn: Callable[["StageContext"], StageOutput]
    depends_on: tuple[str, ...] = ()
    enabled_fn: Callable[[StudyConfig], bool] | None = None
    restore_fn: Callable[["StageContext", StoredOutput], Any] | None = None
    config_sections: tuple[str, ...] = ()
    # every rank of a torch.distributed run takes part (the stage shards its images); otherwise
    # rank 0 runs it alone while the others go on to the next unit they share
    distributed: bool = False

    def enabled(self, config: StudyConfig) -> bool:
        return True if self.enabled_fn is None else bool(self.enabled_fn(config))

    def run(self, context: "StageContext") -> StageOutput:
        return self.run_fn(context)

    def restore(self, context: "StageContext", stored: StoredOutput) -> Any:
        return stored if self.restore_fn is None else self.restore_fn(context, stored)


STAGES: dict[str, Stage]  # the registry, read through __getattr__ below (annotated here for static tools)
_STAGES: dict[str, Stage] = {}  # in run order; a stage comes after every stage it depends on
# The modules defining the built-in stages (imported by `driver`, the probe sweep first): their
# stages register while they import; every other stage, and every use of the registry, waits for them.
_BUILTIN_MODULES = (f"{__package__}.probe_stage", f"{__package__}.experiment_stages")
_DRIVER = f"{__package__}.driver"


def _builtin_stages() -> dict[str, Stage]:
    """The registry, with the built-in stages registered whichever module was imported first
    (`mmlens.runs`, `mmlens.runs.stages` or `mmlens.runs.driver`). While the driver is importing
    them (it is then in `sys.modules`) the registry is returned as it stands."""
    if _DRIVER not in sys.modules:
        importlib.import_module(_DRIVER)
    return _STAGES


def __getattr__(name: str) -> Any:
    if name == "STAGES":  # the registry in run order, the built-in stages first
        return _builtin_stages()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Sections that can change any stage's numbers (what is run, on what, in which precision).
SHARED_SECTIONS = ("model", "dataset", "device", "dtype", "batch_size", "prompt", "n_boot")


def register_stage(
    name: str,
    *,
    title: str,
    depends_on: tuple[str, ...] = (),
    enabled: Callable[[StudyConfig], bool] | None = None,
    restore: Callable[["StageContext", StoredOutput], Any] | None = None,
    sections: tuple[str, ...] = (),
    distributed: bool = False,
) -> Callable[[Callable[["StageContext"], StageOutput]], FunctionStage]:
    """Decorator: register `run(context) -> StageOutput` as the stage `name`, run after its
    dependencies; `sections` are the config sections it reads (besides `SHARED_SECTIONS`);
    `distributed`: every rank of a multi-process run takes part in it."""

    def decorate(run: Callable[["StageContext"], StageOutput]) -> FunctionStage:
        stage = FunctionStage(name, title, run, tuple(depends_on), enabled, restore, tuple(sections), distributed)
        _add(stage, builtin=getattr(run, "__module__", None) in _BUILTIN_MODULES)
        return run

    return decorate


def add_stage(stage: Stage) -> None:
    """Register `stage` after the stages registered so far (the built-in ones first)."""
    _add(stage, builtin=False)


def _add(stage: Stage, *, builtin: bool) -> None:
    # a built-in stage registers while its module imports; any other waits for the built-in ones
    registry = _STAGES if builtin else _builtin_stages()
    missing = [d for d in stage.depends_on if d not in registry]
    if missing:
        raise ValueError(f"stage {stage.name!r} depends on {missing}, which are not registered before it")
    if "/" in stage.name:
        raise ValueError(f"stage names cannot contain '/', got {stage.name!r}")
    unknown = [s for s in stage.config_sections if s not in StudyConfig.__dataclass_fields__]
    if unknown:
        raise ValueError(f"stage {stage.name!r} reads unknown config sections {unknown}")
    registry[stage.name] = stage


def unit_name(stage: str, seed: int) -> str:
    return f"{stage}/seed-{seed}"


def unit_keys(config: StudyConfig, plan: list[tuple[Stage, int]]) -> dict[str, str]:
    """Each planned unit's key: a hash of what its results depend on (see the module docstring)."""
    canonical, keys = config.canonical(), {}
    for stage, seed in plan:  # dependencies come first in a plan
        sections = {name: canonical[name] for name in (*SHARED_SECTIONS, *stage.config_sections)}
        depends = [keys[unit_name(d, seed)] for d in stage.depends_on]
        text = json.dumps({"stage": stage.name, "seed": seed, "sections": sections, "depends_on": depends},
                          sort_keys=True, separators=(",", ":"))
        keys[unit_name(stage.name, seed)] = hashlib.sha256(text.encode()).hexdigest()
    return keys


def rerun_units(plan: list[tuple[Stage, int]], rerun: tuple[str, ...]) -> set[str]:
    """Units named by `rerun` (a stage, or one unit like "probe_sweep/seed-1") and every unit that
    depends on one of them; an unknown name is a `ConfigError` listing the planned ones."""
    names = {stage.name for stage, _ in plan} | {unit_name(stage.name, seed) for stage, seed in plan}
    unknown = [r for r in rerun if r not in names]
    if unknown:
        raise ConfigError([f"--rerun {r}: not a stage or unit of this study; choose from {sorted(names)}"
                           for r in unknown])
    chosen: set[str] = set()
    for stage, seed in plan:
        unit = unit_name(stage.name, seed)
        if stage.name in rerun or unit in rerun or any(unit_name(d, seed) in chosen for d in stage.depends_on):
            chosen.add(unit)
    return chosen

@dataclass
class Session:
    """What the units of one run share: the model and dataset (loaded once) and the results."""

    config: StudyConfig
    folder: RunFolder | None  # None on ranks other than 0 of a multi-process run: they write nothing
    progress: bool = True
    stages: dict[str, Stage] = field(default_factory=_builtin_stages)
    _model: Any = None
    _dataset: Any = None
    results: dict[str, Any] = field(default_factory=dict)  # unit -> in-memory result

    @property
    def model(self):
        if self._model is None:
            from ..model import HookedMLLM

            from ..placement import rank_placement

            # under torchrun: this rank's own GPU, or its own GPUs for a device map (see placement)
            placement = rank_placement(self.config.device, self.config.device_map)
            self._model = HookedMLLM.from_pretrained(self.config.model, dtype=self.config.dtype, **placement)
        return self._model

    @property
    def dataset(self):
        if self._dataset is None:
            from ..data import load_segmentation

            d = self.config.dataset
            self._dataset = load_segmentation(d.name, path=d.path, split=d.split, n=d.n, seed=d.seed,
                                              image_size=d.image_size)
        return self._dataset


@dataclass
class StageContext:
    """What a stage's `run` sees: the config, this unit's seed, the shared model and dataset,
    and the results of the stages it depends on (same seed)."""

    stage: Stage
    seed: int
    session: Session

    @property
    def config(self) -> StudyConfig:
        return self.session.config

    @property
    def model(self):
        return self.session.model

    @property
    def dataset(self):
        return self.session.dataset

    @property
    def progress(self) -> bool:
        return self.session.progress

    def result(self, stage: str) -> Any:
        """The result of a stage this one depends on, from memory or rebuilt from the run folder."""
        if stage not in self.stage.depends_on:
            raise KeyError(f"stage {self.stage.name!r} does not declare a dependency on {stage!r}; "
                           f"add it to depends_on (now {self.stage.depends_on})")
        unit = unit_name(stage, self.seed)
        if unit not in self.session.results:
            owner = self.session.stages[stage]
            if self.session.progress:  # checking hashes and rebuilding a sweep takes seconds on big runs
                note(f"{unit}: finished earlier; reading it back from the run folder")
            stored = self.session.folder.load(unit)
            self.session.results[unit] = owner.restore(StageContext(owner, self.seed, self.session), stored)
        return self.session.results[unit]


@dataclass
class UnitReport:
    unit: str
    title: str
    ran: bool  # False: skipped, finished by an earlier run
    seconds: float
    summary: list[str]


@dataclass
class StudyRun:
    """What `run_study` did: the run folder, each stage unit run or skipped, and the report written."""

    folder: RunFolder | None  # None on ranks other than 0
    units: list[UnitReport]
    report_path: Path | None = None
    report_problem: str | None = None

    def summary_text(self) -> str:
        if self.folder is None:
            return ""
        lines = [f"run folder {self.folder.path} (config sha256 {self.folder.config_sha256[:12]})"]
        for u in self.units:
            state = f"ran in {u.seconds:.1f} s" if u.ran else f"done earlier ({u.seconds:.1f} s), skipped"
            lines.append(f"- {u.unit}: {state}")
            lines += [f"    {line}" for line in u.summary]
        if self.report_path is not None:
            lines.append(f"report: {self.report_path}")
        elif self.report_problem:
            lines.append(f"no report: {self.report_problem}")
        return "\n".join(lines)


def planned_units(config: StudyConfig, stages: dict[str, Stage] | None = None) -> list[tuple[Stage, int]]:
    """(stage, seed) in run order: seed by seed, each seed's stages in registry order."""
    stages = [s for s in (_builtin_stages() if stages is None else stages).values() if s.enabled(config)]
    enabled = {s.name for s in stages}
    for s in stages:
        off = [d for d in s.depends_on if d not in enabled]
        if off:
            raise ValueError(f"stage {s.name!r} needs {off}, which this config disables")
    return [(stage, seed) for seed in config.seeds for stage in stages]


def run_study(
    config: StudyConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    rerun: tuple[str, ...] = (),
    progress: bool = True,
    report: bool = True,
    echo: Callable[[str], None] = print,
    stages: dict[str, Stage] | None = None,
) -> StudyRun:
    """Run (or resume) every enabled stage of the study into `out_dir`, then build the report.

    `rerun` names stages (or units, "probe_sweep/seed-1") computed again even if finished, with
    every unit that depends on them. `stages` (default: the registry `STAGES`) are the stages to
    run, in order. Model- and data-dependent config values are checked before the first unit."""
    stages = _builtin_stages() if stages is None else stages
    plan = planned_units(config, stages)
    keys = unit_keys(config, plan)
    reruns = rerun_units(plan, tuple(rerun))
    problems = device_problems(config)
    if problems:
        raise ConfigError(problems, "the config, on this machine")
    # under torch.distributed rank 0 owns the run folder (lock, records, files, report) and says
    # which units are left; the other ranks only compute their share of the distributed stages
    main, folder, failure, todo = distributed.is_main(), None, None, []
    if main:
        try:
            folder = RunFolder.create(out_dir, config, keys, overwrite=overwrite, rerun=reruns, echo=echo)
            session = Session(config, folder, progress, stages=stages)
            todo = [unit_name(s.name, seed) for s, seed in plan
                    if unit_name(s.name, seed) in reruns or folder.record(unit_name(s.name, seed)) is None]
            # a finished unit is skipped only while every file it wrote is as it wrote it; a changed
            # one is refused (named, with the --rerun that rebuilds it), never silently recomputed
            folder.check([unit_name(s.name, seed) for s, seed in plan if unit_name(s.name, seed) not in todo])
            if todo:
                problems = model_problems(config, session.model, session.dataset)
                if problems:
                    raise ConfigError(problems, f"the config, checked against {config.model} and its dataset")
        except BaseException as error:
            failure = error
    distributed.wait_for_main()  # rank 0 may take long here: opening the folder, loading and checking the model
    todo, stopped = distributed.broadcast_object((todo, None if failure is None else str(failure)), None)
    if failure is not None:
        if folder is not None:
            folder.close()
        raise failure
    if stopped is not None:
        raise RunFolderError(f"rank 0 stopped before the first unit: {stopped}")
    if not main:
        session = Session(config, None, progress=False, stages=stages)
    try:
        reports = _run_units(session, plan, set(todo), progress and main)
        run = StudyRun(folder, reports)
        if report and main:
            from .report import build_report

            run.report_path, run.report_problem = build_report(folder)
    finally:
        if folder is not None:
            folder.close()
    if main:
        echo(run.summary_text())
    return run


def _run_units(session: Session, plan: list[tuple[Stage, int]], todo: set[str], progress: bool) -> list[UnitReport]:
    folder, reports, versions = session.folder, [], package_versions()
    bar = progress_bar(plan, desc="study", unit="stage", enabled=progress, leave=True)
    for stage, seed in bar:
        unit = unit_name(stage.name, seed)
        bar.set_postfix_str(unit, refresh=False)  # shown at the bar's next draw: a forced one would flood a log file
        shared = getattr(stage, "distributed", False)
        if folder is None:  # a rank other than 0: its share of the distributed units, nothing else
            if unit in todo and shared:
                session.model  # noqa: B018  (loaded before the wait: the stage's collectives are then quick)
                distributed.wait_for_main()  # while rank 0 writes earlier units or runs its own
                _share_dependencies(session, stage, seed)
                _reseed(seed)
                # this rank's share of the result (rank 0 receives the whole): what the stages built on it need
                session.results[unit] = stage.run(StageContext(stage, seed, session)).result
            continue
        if unit not in todo:
            record = folder.record(unit)
            notes = [f"note: finished with {name} {old}, now {versions.get(name)}"
                     for name, old in record.get("versions", {}).items() if versions.get(name) != old]
            reports.append(UnitReport(unit, stage.title, False, record["seconds"], record["summary"] + notes))
            continue
        started, clock = folder.begin(unit), time.perf_counter()
        try:
            if shared:
                distributed.wait_for_main()
                _share_dependencies(session, stage, seed)
            _reseed(seed)
            with nullcontext() if shared else distributed.alone():
                output = stage.run(StageContext(stage, seed, session))
        except BaseException as error:
            folder.fail(unit, error)
            raise
        seconds = time.perf_counter() - clock
        # "processes": how many ranks computed the unit (its results do not depend on it)
        folder.save(unit, output, started=started, seconds=seconds,
                    extra={"stage": stage.name, "seed": seed, "processes": distributed.world_size() if shared else 1})
        session.results[unit] = output.result
        reports.append(UnitReport(unit, stage.title, True, seconds, list(output.summary)))
        note(f"{unit}: done in {seconds:.1f} s", enabled=progress)
    bar.close()
    return reports


def _share_dependencies(session: Session, stage: Stage, seed: int) -> None:
    """Before a distributed unit, every rank holds the results of the units it builds on. A
    rank without one (the unit finished in an earlier run, or rank 0 ran it alone) gets what
    rank 0's run folder stored for it and rebuilds it with the stage's `restore`, as a resumed
    single process does; ranks that hold it already keep theirs. Every rank calls this."""
    if not distributed.active():
        return
    for name in stage.depends_on:
        unit = unit_name(name, seed)
        lacking = distributed.gather_in_order([(distributed.rank(), unit not in session.results)])
        if not any(lacking):
            continue
        stored = distributed.broadcast_object(session.folder.load(unit) if session.folder is not None else None)
        if unit not in session.results:
            if session.progress:
                note(f"{unit}: finished earlier; reading it back from the run folder")
            owner = session.stages[name]
            session.results[unit] = owner.restore(StageContext(owner, seed, session), stored)


def _reseed(seed: int) -> None:
    """Python, NumPy and torch generators start from the unit's seed, whatever ran before."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
