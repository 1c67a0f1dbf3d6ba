"""Whole studies as resumable runs: a validated config, a run folder written atomically, and a
driver that runs the registered stages (probe sweep, anchor knockout, position study) into it.

Importing this package registers the built-in stages; `register_stage` adds more.
"""

from pathlib import Path

from .config import ConfigError, StudyConfig, config_from_dict, load_config
from .folder import RunFolder, RunFolderError
from .outputs import StageFigure, StageOutput, StoredOutput
from .stages import STAGES, FunctionStage, Stage, StageContext, StudyRun, register_stage, run_study
from . import probe_stage, experiment_stages  # noqa: E402,F401  (registers the built-in stages, in order)
from .probe_stage import sweep_from_stored
from .report import build_report, combined_summary

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")  # packaged so `mmlens demo` works from a wheel

__all__ = [
    "DEMO_CONFIG",
    "STAGES",
    "ConfigError",
    "FunctionStage",
    "RunFolder",
    "RunFolderError",
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
    "register_stage",
    "run_study",
    "sweep_from_stored",
]
