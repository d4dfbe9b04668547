"""metrics.jsonl and the wandb backend (offline: the run's transaction log is read back)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from saetrain.config import LoggerConfig
from saetrain.errors import ConfigError
from saetrain.loggers import METRICS_FILE, open_logger


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_jsonl_rows_and_final(tmp_path):
    logger = open_logger(LoggerConfig(name="console"), tmp_path, {"seed": 0})
    logger.log({"step": 4, "tokens": 1024, "loss": 0.5, "fvu": torch.tensor(0.25)})
    logger.log({"fvu": 0.125, "step": 8, "tokens": 2048})
    # Flushed line by line: a run killed here keeps both rows.
    assert [r["step"] for r in _read_jsonl(tmp_path / METRICS_FILE)] == [4, 8]
    logger.log_density(torch.tensor([0.0, 0.5]), step=8)  # not a jsonl row
    logger.finish({"fvu": 0.1, "l0": 4.0})
    rows = _read_jsonl(tmp_path / METRICS_FILE)
    assert rows == [
        {"step": 4, "tokens": 1024, "loss": 0.5, "fvu": 0.25},
        {"step": 8, "tokens": 2048, "fvu": 0.125},
        {"final": {"fvu": 0.1, "l0": 4.0}},
    ]
    assert list(rows[1]) == ["step", "tokens", "fvu"]  # step and tokens lead every row


def test_killed_process_keeps_logged_rows(tmp_path):
    code = (
        "import os; from pathlib import Path; from saetrain.config import LoggerConfig\n"
        "from saetrain.loggers import open_logger\n"
        f"lg = open_logger(LoggerConfig(), Path({str(tmp_path)!r}), {{}})\n"
        "lg.log({'step': 1, 'tokens': 10, 'loss': 2.0})\n"
        "os._exit(9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert _read_jsonl(tmp_path / METRICS_FILE) == [{"step": 1, "tokens": 10, "loss": 2.0}]


def test_row_without_step_is_refused(tmp_path):
    logger = open_logger(LoggerConfig(), tmp_path, {})
    with pytest.raises(ValueError, match="'step'"):
        logger.log({"loss": 1.0})


def test_wandb_missing_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb → ImportError
    with pytest.raises(ConfigError, match=r"logger.name=wandb.*pip install wandb"):
        open_logger(LoggerConfig(name="wandb"), tmp_path, {})
    assert (tmp_path / METRICS_FILE).exists()  # created, then closed


def test_unknown_logger_name(tmp_path):
    with pytest.raises(ConfigError, match="logger.name='tensorboard'.*console, wandb"):
        open_logger(LoggerConfig(name="tensorboard"), tmp_path, {})


# --- wandb, offline -------------------------------------------------------------------------


def _wandb_records(path: Path) -> list[Any]:
    """The records of a .wandb transaction log (LevelDB log format: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        chunk, pos = data[pos : pos + length], pos + length
        if kind in (1, 2):  # full, first
            pending = chunk
        else:  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _finished_records(path: Path, timeout: float = 20.0) -> list[Any]:
    """The run's records once its log is complete: wandb-core (a separate process) may still be
    writing the file's tail for a moment after `finish()` returns."""
    deadline = time.monotonic() + timeout
    kinds: list[str | None] = []
    while True:
        try:
            records = _wandb_records(path)
            kinds = [r.WhichOneof("record_type") for r in records]
            if "run" in kinds and "exit" in kinds:
                return records
        except Exception:  # a chunk still being written
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never held a complete run: {kinds}")
        time.sleep(0.1)


def _offline_run(wandb_dir: Path) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """(run record, history rows, summary) of the single offline run under `wandb_dir`."""
    files = list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    run, history, summary = None, [], {}
    for record in _finished_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            history.append(
                {
                    "/".join(i.nested_key) or i.key: json.loads(i.value_json)
                    for i in record.history.item
                }
            )
        elif kind == "summary":
            for u in record.summary.update:
                summary["/".join(u.nested_key) or u.key] = json.loads(u.value_json)
    return run, history, summary


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch) -> Path:
    pytest.importorskip("wandb")
    wandb_dir = tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    return wandb_dir


def test_wandb_offline_run_holds_config_history_density_and_summary(tmp_path, offline_wandb):
    cfg = LoggerConfig(name="wandb", wandb_project="proj", wandb_run_name="k32")
    config = {"dictionary": {"k": 32}, "seed": 3}
    logger = open_logger(cfg, tmp_path / "run", config, prefix="resid_post.1")
    logger.log({"step": 10, "tokens": 2560, "loss": 0.75, "fvu": 0.5})
    logger.log({"step": 20, "tokens": 5120, "loss": 0.5, "fvu": 0.25})
    logger.log_density(torch.tensor([0.0, 1e-3, 1e-2, 0.5]), step=20)
    logger.finish({"fvu": 0.2, "ce_recovered": 0.9})

    run, history, summary = _offline_run(offline_wandb)
    assert run.project == "proj" and run.display_name == "k32"
    config_seen = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config_seen["dictionary"] == {"k": 32} and config_seen["seed"] == 3
    scalars = [(h["_step"], h.get("resid_post.1/fvu")) for h in history if "resid_post.1/fvu" in h]
    assert scalars == [(10, 0.5), (20, 0.25)]
    assert [h["resid_post.1/tokens"] for h in history if "resid_post.1/tokens" in h] == [
        2560,
        5120,
    ]
    density = [h for h in history if "resid_post.1/feature_density_log10/_type" in h]
    assert len(density) == 1 and density[0]["_step"] == 20
    assert density[0]["resid_post.1/feature_density_log10/_type"] == "histogram"
    bins = density[0]["resid_post.1/feature_density_log10/bins"]
    assert bins[0] == pytest.approx(-10.0) and bins[-1] == pytest.approx(
        torch.log10(torch.tensor(0.5 + 1e-10)).item(), abs=1e-6
    )
    assert sum(density[0]["resid_post.1/feature_density_log10/values"]) == 4
    assert summary["resid_post.1/final/fvu"] == 0.2
    assert summary["resid_post.1/final/ce_recovered"] == 0.9
    # metrics.jsonl is written beside it, unprefixed
    rows = _read_jsonl(tmp_path / "run" / METRICS_FILE)
    assert rows[0] == {"step": 10, "tokens": 2560, "loss": 0.75, "fvu": 0.5}
    assert rows[-1] == {"final": {"fvu": 0.2, "ce_recovered": 0.9}}


def test_two_dictionaries_share_one_wandb_run(tmp_path, offline_wandb):
    cfg = LoggerConfig(name="wandb")
    a = open_logger(cfg, tmp_path / "a", {}, prefix="a")
    b = open_logger(cfg, tmp_path / "b", {}, prefix="b")
    assert a.backends[1].run is b.backends[1].run
    a.log({"step": 1, "fvu": 0.5})
    b.log({"step": 1, "fvu": 0.75})
    a.finish({"fvu": 0.4})
    b.finish({"fvu": 0.6})
    _run, history, summary = _offline_run(offline_wandb)  # exactly one run file
    merged = {k: v for h in history for k, v in h.items()}
    assert merged["a/fvu"] == 0.5 and merged["b/fvu"] == 0.75
    assert summary["a/final/fvu"] == 0.4 and summary["b/final/fvu"] == 0.6
