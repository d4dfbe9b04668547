"""`eval.suite`: the usefulness suites by name, run one after another on one dictionary.

The evaluate CLI and the run both call `run_suites`, then `write_saebench` once the folder the
files go in exists; a sweep reads the merged metrics from each job's saetrain_run.json.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saetrain.atomic import atomic_write_json
from saetrain.config import EvalConfig
from saetrain.evaluation.usefulness import SuiteContext, SuiteResult
from saetrain.evaluation.usefulness.absorption import run_absorption
from saetrain.evaluation.usefulness.sparse_probing import run_sparse_probing
from saetrain.progress import emit, phase

log = logging.getLogger(__name__)

Suite = Callable[[SuiteContext, Any], SuiteResult]


SUITES: dict[str, Suite] = {
    "absorption": run_absorption,
    "sparse_probing": run_sparse_probing,
}


def run_suites(ctx: SuiteContext, cfg: EvalConfig) -> dict[str, SuiteResult]:
    """Each suite of `cfg.suite` in order, with its config `cfg.<name>`; notes are printed."""
    results = {}
    for name in cfg.suite:
        with phase(f"eval.suite {name} on {ctx.sae_name}"):
            result = SUITES[name](ctx, getattr(cfg, name, None))  # eval.<name>: its settings
        for note in result.notes:
            emit(f"{name}: {note}", log)
        results[name] = result
    return results


def suite_metrics(results: dict[str, SuiteResult]) -> dict[str, float]:
    """The suites' metrics merged, for the run's / evaluation's metrics."""
    merged: dict[str, float] = {}
    for result in results.values():
        merged |= result.metrics
    return merged


def saebench_path(output_dir: Path, suite: str) -> Path:
    return Path(output_dir) / f"{suite}_saebench.json"


def write_saebench(results: dict[str, SuiteResult], output_dir: Path) -> list[Path]:
    """`<output_dir>/<suite>_saebench.json` per suite with a result (a refused one has none)."""
    written = []
    for name, result in results.items():
        if result.saebench:
            path = saebench_path(output_dir, name)
            atomic_write_json(path, result.saebench)
            written.append(path)
    return written


def evaluate_usefulness(
    ctx: SuiteContext, cfg: EvalConfig, write: bool = True
) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Run `cfg.suite` on `ctx`; write the SAEBench files into ctx.output_dir (when `write`);
    return the merged metrics and each suite's notes."""
    results = run_suites(ctx, cfg)
    if write:
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        write_saebench(results, ctx.output_dir)
    return suite_metrics(results), {name: r.notes for name, r in results.items() if r.notes}
