"""The study driver with its built-in stages registered, in run order.

`stages.py` holds the registry and the driver; the built-in stages register themselves when their
modules are imported, the probe sweep first because the experiments depend on it. Importing the
driver through here (as `mmlens.runs` does on first use of a driver name) guarantees both;
`stages.py` imports this module itself before it first uses the registry (`STAGES`, `run_study`,
`planned_units`, a stage registered from elsewhere), so importing it directly is safe too.
"""

from .stages import STAGES, FunctionStage, Stage, StageContext, StudyRun, register_stage, run_study
from . import probe_stage, experiment_stages  # noqa: E402,F401  (registers the built-in stages, in order)

__all__ = ["STAGES", "FunctionStage", "Stage", "StageContext", "StudyRun", "register_stage", "run_study"]
