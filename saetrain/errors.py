"""Every error and warning saetrain raises on purpose, and the exit code each gives the CLIs.

At the bottom of the import graph (it imports nothing from saetrain), so that any module can raise
any of them; import them from here (saetrain.config, the schemas, imports nothing from saetrain,
so it does not re-export ConfigError).

Exit codes of `python -m saetrain`, `python -m saetrain.evaluate` / `saetrain.inspect` and
`python -m saetrain.sweep` (docs/troubleshooting.md):

- 0: success;
- 2 (EXIT_BAD_INPUT): bad input, a message and no traceback: ConfigError (and its subclasses
  RunFolderLocked, MissingDependency, TaskUnavailable), SiteError, FileNotFoundError (and
  FolderFormatError); the training CLI also CacheError, the folder CLIs also Hydra's and
  OmegaConf's errors (the training CLI's Hydra reports those itself);
- 3 (EXIT_STOPPED): training stopped with its work kept: TrainingInterrupted (after a
  checkpoint), TrainingDiverged, PublishError;
- 4 (EXIT_DISTRIBUTED): DistributedError (under torchrun, a rank died or stopped answering);
- 128 + signal: RunStopped (a signal outside the training loop: 143 for SIGTERM, 130 for SIGINT);
- 130 (EXIT_INTERRUPTED): KeyboardInterrupt (a second Ctrl-C during training).
"""

from __future__ import annotations

import signal
from pathlib import Path

# --- config and input -----------------------------------------------------------------------


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field, the value and the choices."""


class RunFolderLocked(ConfigError):
    """Another live process writes this run folder (exit code 2, like other bad input)."""


class MissingDependency(ConfigError):
    """A suite was asked for but scikit-learn (or scipy) is not installed (the CLIs report it as
    bad input: exit 2, a message, no traceback)."""


class TaskUnavailable(ConfigError):
    """A built-in task this machine cannot make (e.g. a Python without its test suite)."""


class SiteError(ValueError):
    """A site name, layer or model family that cannot be resolved (message names valid choices)."""


class CacheError(RuntimeError):
    """A cache that cannot be trusted (corrupted shard, manifest of another key)."""


# --- training ---------------------------------------------------------------------------------


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT stopped the run after a checkpoint was written.

    `reason` says where it stopped; the message adds how to continue (the CLI prints its own
    command line instead, built from the run's overrides).
    """

    def __init__(self, reason: str, checkpoint: Path | None = None):
        self.reason = reason
        self.checkpoint = checkpoint
        # save_checkpoint writes <run folder>/checkpoints/step-N.pt
        self.run_dir = checkpoint.parent.parent if checkpoint is not None else None
        hint = ""
        if self.run_dir is not None:
            hint = (
                f"; continue it with resume={self.run_dir} (from Python: "
                f"run(dataclasses.replace(cfg, resume={str(self.run_dir)!r}), output_dir))"
            )
        super().__init__(reason + hint)


class RunStopped(BaseException):
    """A signal stopped the run outside the training loop. A BaseException, as KeyboardInterrupt
    is, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int, phase: str, run_dir: Path, written: str, resumable: bool):
        self.signum = signum
        self.phase = phase
        self.run_dir = run_dir
        self.resumable = resumable
        self.exit_code = 128 + signum  # what the shell reports for a process the signal killed
        self.reason = f"{signal.Signals(signum).name} during {phase}: stopped; {written}"
        hint = f"; continue it with resume={run_dir}" if resumable else ""
        super().__init__(self.reason + hint)


class DistributedError(RuntimeError):
    """A collective failed or timed out (a peer died or stopped answering). Terminal: the group
    cannot be used again, so no checkpoint or export may follow it."""


# --- export and other tools' folders ------------------------------------------------------------


class PublishError(RuntimeError):
    """An upload that could not happen; the message says why and what to do. Files are kept."""


class NormFoldError(ValueError):
    """A norm that is not g(x)·a + c, or a fold that needs 1/a where a is zero."""


class FolderFormatError(FileNotFoundError):
    """A folder that is no dictionary of any format saetrain reads."""


class UnsupportedFieldError(ValueError):
    """A config field whose value saetrain cannot reproduce: refused by name."""


class UnknownFieldWarning(UserWarning):
    """A config field the reader does not know: it might change the dictionary's math."""


class CircuitTracerExportError(ValueError):
    """Tensors, layers or sites that circuit-tracer's loaders cannot take (the message says why)."""


# --- exit codes ---------------------------------------------------------------------------------

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
EXIT_DISTRIBUTED = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what the shell reports for Ctrl-C

# Bad input for every CLI (subclasses included: RunFolderLocked, FolderFormatError, ...).
BAD_INPUT: tuple[type[Exception], ...] = (ConfigError, SiteError, FileNotFoundError)
# The training CLI's table, in the order it is checked (RunStopped: `exit_code`, 128 + signal).
TRAIN_EXIT_CODES: tuple[tuple[tuple[type[BaseException], ...], int], ...] = (
    ((*BAD_INPUT, CacheError), EXIT_BAD_INPUT),
    ((TrainingInterrupted, TrainingDiverged, PublishError), EXIT_STOPPED),
    ((DistributedError,), EXIT_DISTRIBUTED),
    ((KeyboardInterrupt,), EXIT_INTERRUPTED),
)


def train_exit_code(error: BaseException) -> int | None:
    """The exit code `python -m saetrain` gives `error`; None for one it does not expect (which
    ends with its traceback)."""
    if isinstance(error, RunStopped):
        return error.exit_code
    for types, code in TRAIN_EXIT_CODES:
        if isinstance(error, types):
            return code
    return None
