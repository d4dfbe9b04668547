"""What run() hands back: each dictionary's folder and held-out metrics; for a resume that finds
the run finished, what the finished run saved."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from saetrain.progress import emit
from saetrain.training.run_folder import finished

log = logging.getLogger("saetrain.run")  # the run's one logger, whichever module of it writes


@dataclass
class DictionaryResult:
    name: str
    dictionary_dir: Path
    metrics: dict[str, float]


@dataclass
class RunResult:
    output_dir: Path
    dictionary_dir: Path  # the first dictionary's folder
    metrics: dict[str, float]  # the first dictionary's held-out metrics
    dictionaries: list[DictionaryResult]
    already_finished: bool = False  # a resume found the run finished and changed nothing


def already_finished(output_dir: Path, says: bool = True) -> RunResult:
    """The result a finished run saved, for a resume that has nothing left to do (`says`: the
    rank that reports it)."""
    marker = finished(output_dir) or {}
    results = []
    for name in marker.get("dictionaries", []):
        folder = output_dir / name
        info = json.loads((folder / "saetrain_run.json").read_text())
        results.append(DictionaryResult(name, folder, info["final_metrics"]))
    if says:
        emit(f"saetrain: already finished: {output_dir} (nothing to resume; left as it was)", log)
    first = results[0] if results else DictionaryResult("", output_dir, {})
    return RunResult(output_dir, first.dictionary_dir, first.metrics, results, True)
