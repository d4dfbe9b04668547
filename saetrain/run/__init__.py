"""One run, wired end to end: LM + data → buffer → trainer → evaluation → export.

`run()` (story.py) reads top to bottom: plan (plan.py: the config checked; the run folder fresh,
resumed or finished; the dictionaries and their columns) → load (load.py: LMs, data, cache,
loggers) → stream and train (train_loop.py: the buffer, the trainers, checkpoints) → finish
(finish.py: fold, evaluate, export, publish, transcoder sets, inspect). report.py holds what the
run says and records (console lines, saetrain_run.json, cfg.json's SAELens metadata); result.py
what it returns. The names tests and scripts import are re-exported here.
"""

from saetrain.run.plan import normalized
from saetrain.run.report import (
    git_revision,
    model_record,
    package_versions,
    print_summary,
    saelens_metadata,
)
from saetrain.run.result import DictionaryResult, RunResult
from saetrain.run.story import run

__all__ = [
    "DictionaryResult",
    "RunResult",
    "git_revision",
    "model_record",
    "normalized",
    "package_versions",
    "print_summary",
    "run",
    "saelens_metadata",
]
