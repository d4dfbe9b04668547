"""Progress lines: throttled, with done/total, rate and ETA; every long phase of a run reports
(buffer fill, evaluation, CE splicing, export), and the run's log file has the final metrics and
the save path, which the console shows once."""

from __future__ import annotations

import logging
import sys

import pytest

from saetrain.progress import Progress, ReportedList, current_phase, emit, phase
from tests.helpers.cli_process import finish, start_cli, tiny_overrides


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_are_throttled_and_say_rate_and_eta(caplog):
    clock = _Clock()
    caplog.set_level(logging.INFO, logger="saetrain.progress")
    with Progress("buffer fill", 1000, "rows", every_s=5.0, clock=clock) as progress:
        assert current_phase() == "buffer fill (0/1.0k rows)"
        for _ in range(10):
            clock.now += 1.0
            progress.update(50)  # 50 rows/s
    assert current_phase() is None
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "buffer fill: starting (1.0k rows)"
    # One line after 5 s and one after 10 s, not one per update; then the last.
    assert lines[1:3] == [
        "buffer fill: 250/1.0k rows (25%) | 50 rows/s | eta 0m15s",
        "buffer fill: 500/1.0k rows (50%) | 50 rows/s | eta 0m10s",
    ]
    assert lines[3] == "buffer fill: done, 500 rows in 10.0 s (50 rows/s)"
    assert len(lines) == 4


def test_a_reported_list_counts_what_its_consumer_took(caplog):
    caplog.set_level(logging.INFO, logger="saetrain.progress")
    batches = ReportedList([[1, 2], [3, 4, 5]], "evaluation", "contexts", len, every_s=0.0)
    seen = []
    for _ in batches:
        seen.append(current_phase())
    assert seen == ["evaluation (0/5 contexts)", "evaluation (2/5 contexts)"]
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "evaluation: starting (5 contexts)"
    assert messages[-1].startswith("evaluation: done, 5 contexts in ")
    assert current_phase() is None


def test_a_failed_phase_leaves_no_current_phase(caplog):
    caplog.set_level(logging.INFO, logger="saetrain.progress")
    with pytest.raises(RuntimeError), phase("upload to you/saes"):
        assert current_phase() == "upload to you/saes"
        raise RuntimeError("network")
    assert current_phase() is None
    assert [r.getMessage() for r in caplog.records] == ["upload to you/saes: starting"]


def test_emit_prints_only_when_no_console_handler_shows_the_log(capsys):
    logger = logging.getLogger("saetrain.test_emit")
    emit("final metrics", logger)
    assert capsys.readouterr().out == "final metrics\n"  # logging not set up: printed
    handler = logging.StreamHandler(sys.stdout)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        emit("final metrics", logger)
    finally:
        logger.removeHandler(handler)
    assert capsys.readouterr().out == "final metrics\n"  # once, by the handler


def test_every_long_phase_reports_in_the_runs_log_file(tiny_model, corpus, tmp_path):
    out = tmp_path / "run"
    hydra_dir = tmp_path / "hydra"
    child = start_cli(tiny_overrides(tiny_model, corpus, out), tmp_path, hydra_dir=hydra_dir)
    console = finish(child, timeout=300)
    assert child.returncode == 0, console[-3000:]
    (log_file,) = hydra_dir.glob("*.log")
    text = log_file.read_text()
    for fragment in (
        "model load (",
        "held-out contexts: done in ",
        "buffer fill: starting (1.0k rows)",
        "buffer fill: done, 1.0k rows in ",
        "evaluation: starting (",
        "evaluation: done, ",
        "CE splicing: starting (8 contexts)",
        "CE splicing: done, 8 contexts in ",
        f"export to {out / 'resid_post.1'}: done in ",
        "held-out evaluation:",
        "  ce_recovered ",
        f"dictionary saved to {out / 'resid_post.1'}",
    ):
        assert fragment in text, fragment
    assert console.count("dictionary saved to") == 1  # logged, not also printed
