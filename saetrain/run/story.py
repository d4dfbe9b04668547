"""One run, top to bottom: plan → load → stream → train → finish, each one call into the module
that holds it (plan.py, load.py, train_loop.py, finish.py; report.py says and records what
happened, result.py is what run() returns). Which rank writes what is asked of DataParallel
inside those steps, not here."""

from __future__ import annotations

import time
from pathlib import Path

from saetrain.config import Config
from saetrain.distributed import world_session
from saetrain.distributed.data_parallel import DataParallel, only_main_reports
from saetrain.run.finish import finish
from saetrain.run.load import load
from saetrain.run.plan import begin, checked
from saetrain.run.result import RunResult
from saetrain.run.train_loop import feeding, stream_record, train
from saetrain.training.run_folder import RunGuard


def run(cfg: Config, output_dir: str | Path, outputs_root: str | Path | None = None) -> RunResult:
    """Train, evaluate and save every dictionary `cfg` describes, from one LM pass.

    With `cfg.resume`, continue the run folder it names from its last checkpoint instead
    (`outputs_root`: where `resume=true` looks for the newest run when output_dir has none);
    a run that already finished is left as it is. The run folder is locked while this process
    writes it; SIGTERM / SIGINT outside training raise RunStopped, naming the phase.

    Started by torchrun, each rank calls this: they train on their shares of the stream
    (saetrain/distributed/data_parallel.py), and rank 0 alone writes the run folder's shared
    files (the checkpoints' shared part, the exports, the logs).
    """
    with (
        world_session(cfg.model.device, cfg.distributed.timeout_s) as world,
        only_main_reports(world),
    ):
        dp = DataParallel(world)
        # One run folder for all ranks: rank 0's (each rank's Hydra may have made its own).
        output_dir, outputs_root = dp.decide((output_dir, outputs_root))
        with RunGuard(output_dir) as guard:
            result = _story(cfg, output_dir, outputs_root, guard, dp)
        dp.finish()
        return result


def _story(
    cfg: Config,
    output_dir: str | Path,
    outputs_root: str | Path | None,
    guard: RunGuard,
    dp: DataParallel,
) -> RunResult:
    started = time.time()
    # Plan: the config checked against the model's config and the data, before any weights load.
    cfg, shape = checked(cfg, dp)
    # The run folder: fresh, resumed from its last checkpoint, or finished (left as it is).
    begun = begin(cfg, output_dir, outputs_root, guard, dp)
    if begun.finished is not None:
        return begun.finished
    # Load: the LM(s), the dictionaries laid out on its sites, the data, the cache, the loggers.
    setup = load(cfg, shape, begun, guard, dp, started)
    try:
        # Stream and train: every dictionary from the same batches, one LM pass.
        with feeding(setup) as feed:
            trained = train(setup, feed)
        # Finish: evaluate, export, publish, inspect.
        return finish(setup, stream_record(setup, feed, trained))
    except BaseException:
        setup.abort_loggers()
        raise
