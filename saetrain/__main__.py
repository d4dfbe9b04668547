"""`python -m saetrain [overrides]`: compose the Hydra config, then call run()."""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from saetrain import config_dir
from saetrain.checks import to_config
from saetrain.config import register_configs
from saetrain.errors import (
    EXIT_BAD_INPUT,
    RunStopped,
    TrainingInterrupted,
    train_exit_code,
)
from saetrain.run import run

register_configs()


@hydra.main(config_path=config_dir(), config_name="config", version_base=None)
def _main(node: DictConfig) -> dict[str, float]:
    try:
        cfg = to_config(node)
        hydra = HydraConfig.get()
        if cfg.publish.repo_id and cfg.publish.prefix is None:
            prefix = multirun_prefix(hydra.mode, hydra.job.override_dirname)
            cfg = dataclasses.replace(cfg, publish=dataclasses.replace(cfg.publish, prefix=prefix))
        hydra_dir = Path(hydra.runtime.output_dir)
        output_dir = cfg.output_dir or hydra_dir
        # `resume=true` without output_dir looks for the newest run under outputs/ (run mode's
        # folders are outputs/<date>/<time>).
        outputs_root = hydra_dir.parents[1] if len(hydra_dir.parents) > 1 else None
        return run(cfg, output_dir, outputs_root).metrics
    except BaseException as e:  # the exit-code table (saetrain/errors.py) says which end here
        code = train_exit_code(e)
        if code is None:
            raise
        report(e, code)
        sys.exit(code)


def report(error: BaseException, code: int) -> None:
    """What the CLI prints for an error that ends it with `code`: the message, and the command
    line that continues the run when a checkpoint is there to resume from."""
    resume_dir: Path | None = None
    if code == EXIT_BAD_INPUT:
        message = f"error: {error}"
    elif isinstance(error, KeyboardInterrupt):
        message = "interrupted (a second Ctrl-C: no checkpoint written)"
    elif isinstance(error, TrainingInterrupted):
        message, resume_dir = error.reason, error.run_dir
    elif isinstance(error, RunStopped):  # a signal outside training (exit 143 SIGTERM, 130 SIGINT)
        message, resume_dir = error.reason, error.run_dir if error.resumable else None
    else:  # TrainingDiverged, PublishError; DistributedError (a rank died or stopped answering)
        message = str(error)
    print(f"saetrain: {message}", file=sys.stderr)
    if resume_dir is not None:
        print(f"saetrain: resume with: {resume_command(resume_dir)}", file=sys.stderr)


def multirun_prefix(mode: RunMode | None, override_dirname: str) -> str | None:
    """A sweep job's upload prefix: its overrides (`dictionary.k=32,trainer.lr=0.001`); None
    outside a multirun."""
    if mode != RunMode.MULTIRUN:
        return None
    return override_dirname or None


def resume_command(run_dir: Path) -> str:
    """The command line that continues `run_dir`: this run's overrides, with resume= set."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # HydraConfig is not set outside a Hydra job
        overrides = []
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != "resume"]
    args = [*kept, f"resume={Path(run_dir).resolve()}"]
    return shlex.join([*launcher(), "-m", "saetrain", *args])


def launcher(env: Mapping[str, str] | None = None) -> list[str]:
    """`python`, or the torchrun line with this run's world size: a checkpoint written by N
    ranks resumes only with N (each rank's buffer and stream position are in it)."""
    env = os.environ if env is None else env
    world, local = int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_WORLD_SIZE", "1"))
    if world <= 1:
        return ["python"]
    nodes = [f"--nnodes={world // local}"] if world > local else []
    return ["torchrun", *nodes, f"--nproc-per-node={local}"]


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
