"""Metric logging backends: metrics.jsonl always, Weights & Biases on request.

The trainer and run() talk to one `MetricLogger` from `open_logger()`; which backends sit behind it
is the config's business (`logger.name`). metrics.jsonl is written line by line and flushed, so a
killed run keeps every row it logged, and it is opened for appending so a resumed run continues the
same file. wandb is optional: it is imported only when `logger.name=wandb`.

Several dictionaries trained in one process may each open a logger with their own `prefix`: they
share one wandb run (opened by the first, finished by the last) and their keys are `prefix/name`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch

from saetrain.config import LoggerConfig
from saetrain.errors import ConfigError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# Frequencies of latents that never fired are shown at log10(this) in density histograms.
DENSITY_FLOOR = 1e-10


class MetricLogger(Protocol):
    """What the trainer and run() call; every backend implements all three."""

    def log(self, row: dict[str, Any]) -> None:
        """One row of scalars; `step` (and `tokens`, if present) say where in training."""

    def log_density(self, frequencies: torch.Tensor, step: int) -> None:
        """Per-latent firing frequencies [n_latents] (fraction of tokens each latent fires on)."""

    def finish(self, final_metrics: dict[str, Any]) -> None:
        """The final evaluation; the logger is closed afterwards."""


def _scalar(value: Any) -> Any:
    """Plain Python numbers for JSON and wandb (tensors and numpy scalars included)."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def log_frequencies(frequencies: torch.Tensor) -> torch.Tensor:
    """log10 of firing frequencies, with never-fired latents at log10(DENSITY_FLOOR)."""
    return torch.log10(frequencies.detach().double().cpu().clamp_min(0) + DENSITY_FLOOR)


class JsonlLogger:
    """Appends one JSON object per line to `run_dir/metrics.jsonl`, flushed after each line."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS_FILE
        self._file = open(self.path, "a", encoding="utf-8")  # closed in finish()

    def _write(self, obj: dict[str, Any]) -> None:
        if self._file.closed:
            raise RuntimeError(f"{self.path} is closed: the logger has already finished")
        self._file.write(json.dumps(obj, default=str) + "\n")
        self._file.flush()

    def log(self, row: dict[str, Any]) -> None:
        if "step" not in row:
            raise ValueError(f"a logged row needs a 'step' key; got keys {sorted(row)}")
        first = {k: _scalar(row[k]) for k in ("step", "tokens") if k in row}
        rest = {k: _scalar(v) for k, v in row.items() if k not in first}
        self._write(first | rest)

    def log_density(self, frequencies: torch.Tensor, step: int) -> None:
        """Not written to the file: densities go to the evaluation's metrics.json and PNG."""

    def finish(self, final_metrics: dict[str, Any]) -> None:
        if not self._file.closed:
            self._write({"final": {k: _scalar(v) for k, v in final_metrics.items()}})
            self._file.close()

    def close(self) -> None:
        self._file.close()


class _SharedWandbRun:
    """One wandb run per process, shared by every logger that asks for it (reference counted)."""

    run: Any = None
    users = 0


class WandbLogger:
    """Scalars, density histograms and final metrics to Weights & Biases (`prefix/` keys)."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], prefix: str):
        try:  # wandb is optional (saetrain[wandb]) and slow to import: only this logger needs it
            import wandb
        except ImportError:
            raise ConfigError(
                "logger.name=wandb needs the wandb package, which is not installed: "
                "`pip install wandb` (or use logger.name=console)"
            ) from None
        self._wandb = wandb
        self.prefix = prefix
        self._finished = False
        if _SharedWandbRun.run is None:
            try:
                _SharedWandbRun.run = wandb.init(
                    project=cfg.wandb_project,
                    entity=cfg.wandb_entity,
                    name=cfg.wandb_run_name,
                    config=config,
                    dir=os.environ.get("WANDB_DIR") or str(run_dir),
                )
            except Exception as e:  # wandb raises several types (auth, usage, network)
                raise ConfigError(
                    f"logger.name=wandb: wandb.init failed for wandb_project="
                    f"{cfg.wandb_project!r}, wandb_entity={cfg.wandb_entity!r}: {e}. Log in with "
                    "`wandb login`, or set WANDB_MODE=offline to keep the run on disk"
                ) from None
        _SharedWandbRun.users += 1
        self.run = _SharedWandbRun.run

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        scalars = {self._key(k): _scalar(v) for k, v in row.items() if k != "step"}
        self.run.log(scalars, step=step)

    def log_density(self, frequencies: torch.Tensor, step: int) -> None:
        values = log_frequencies(frequencies).numpy()
        histogram = self._wandb.Histogram(values, num_bins=64)
        self.run.log({self._key("feature_density_log10"): histogram}, step=int(step))

    def finish(self, final_metrics: dict[str, Any]) -> None:
        if self._finished:
            return
        self._finished = True
        for name, value in final_metrics.items():
            value = _scalar(value)
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)  # the summary is JSON; keep NaN/inf readable
            self.run.summary[self._key(f"final/{name}")] = value
        self._release(exit_code=0)

    def abort(self) -> None:
        """End after an error: the wandb run is marked failed (exit code 1)."""
        if not self._finished:
            self._finished = True
            self._release(exit_code=1)

    def _release(self, exit_code: int) -> None:
        _SharedWandbRun.users -= 1
        if _SharedWandbRun.users <= 0:
            _SharedWandbRun.run, _SharedWandbRun.users = None, 0
            self.run.finish(exit_code=exit_code)


class CompositeLogger:
    """Fans each call out to every backend; usable as a context manager that finishes on error."""

    def __init__(self, backends: list[Any]):
        self.backends = backends
        self._finished = False

    @property
    def metrics_path(self) -> Path:
        return next(b.path for b in self.backends if isinstance(b, JsonlLogger))

    def log(self, row: dict[str, Any]) -> None:
        for backend in self.backends:
            backend.log(row)

    def log_density(self, frequencies: torch.Tensor, step: int) -> None:
        for backend in self.backends:
            backend.log_density(frequencies, step)

    def finish(self, final_metrics: dict[str, Any]) -> None:
        if self._finished:
            return
        self._finished = True
        for backend in self.backends:
            backend.finish(final_metrics)

    def abort(self) -> None:
        """Close every backend without final metrics (the run failed)."""
        if self._finished:
            return
        self._finished = True
        for backend in self.backends:
            if isinstance(backend, WandbLogger):
                backend.abort()
            elif isinstance(backend, JsonlLogger):
                backend.close()

    def __enter__(self) -> CompositeLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()


def open_logger(
    cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], prefix: str = ""
) -> CompositeLogger:
    """The run's logger: metrics.jsonl in `run_dir`, plus wandb when `cfg.name == "wandb"`.

    `config` is the resolved run config (stored in the wandb run); `prefix` namespaces the wandb
    keys of one dictionary among several trained together (e.g. the site name).
    """
    if cfg.name not in ("console", "wandb"):
        raise ConfigError(f"logger.name={cfg.name!r} is not valid; choose one of: console, wandb")
    run_dir = Path(run_dir)
    backends: list[Any] = [JsonlLogger(run_dir)]
    if cfg.name == "wandb":
        try:
            backends.append(WandbLogger(cfg, run_dir, config, prefix))
        except BaseException:
            backends[0].close()
            raise
    return CompositeLogger(backends)
