"""Whole studies as resumable runs: a validated config, a run folder written atomically, and a
driver that runs the registered stages (probe sweep, anchor knockout, position study) into it.

Importing the stage driver (`run_study`, `STAGES`, `register_stage`, ...) registers the built-in
stages; `register_stage` adds more. Names load on first use, so reading and validating a config
(`load_config`) does not import torch.
"""

from pathlib import Path
from typing import TYPE_CHECKING

from ..lazy import lazy_exports
from .config import ConfigError, StudyConfig, config_from_dict, load_config

if TYPE_CHECKING:  # what static tools (type checkers, the API docs) resolve the lazy names to
    from .folder import RunFolder, RunFolderError
    from .loading import RunResults, load_run
    from .outputs import StageFigure, StageOutput, StoredOutput
    from .probe_stage import sweep_from_stored
    from .report import build_report, combined_summary
    from .driver import STAGES, FunctionStage, Stage, StageContext, StudyRun, register_stage, run_study

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")  # packaged so `mmlens demo` works from a wheel

# The stage driver is reached through `driver`, which registers the built-in stages in their order.
__getattr__, __dir__ = lazy_exports(__name__, {
    **{name: ".driver" for name in ("STAGES", "FunctionStage", "Stage", "StageContext", "StudyRun",
                                     "register_stage", "run_study")},
    "RunFolder": ".folder",
    "RunFolderError": ".folder",
    "RunResults": ".loading",
    "load_run": ".loading",
    **{name: ".outputs" for name in ("StageFigure", "StageOutput", "StoredOutput")},
    "sweep_from_stored": ".probe_stage",
    "build_report": ".report",
    "combined_summary": ".report",
})

__all__ = [
    "DEMO_CONFIG",
    "STAGES",
    "ConfigError",
    "FunctionStage",
    "RunFolder",
    "RunFolderError",
    "RunResults",
    "Stage",
    "StageContext",
    "StageFigure",
    "StageOutput",
    "StoredOutput",
    "StudyConfig",
    "StudyRun",
    "build_report",
    "combined_summary",
    "config_from_dict",
    "load_config",
    "load_run",
    "register_stage",
    "run_study",
    "sweep_from_stored",
]
