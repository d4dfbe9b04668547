"""The run folder: one writer at a time (a second process is refused with the holder's pid), a
finished run answers resume with "already finished" and stays byte-identical, and the rate a
resumed run reports counts only the tokens it trained itself."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from saetrain.errors import ConfigError
from saetrain.run import run
from saetrain.training import fit as fit_module
from saetrain.training.checkpoint import list_checkpoints
from saetrain.training.run_folder import LOCK_FILE, RunFolderLocked, RunLock
from tests.helpers.runs import _cfg, _fail_at_step

HOLDER = """
import sys, time
from saetrain.training.checkpoint import list_checkpoints
from saetrain.training.run_folder import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_second_process_on_a_locked_run_folder_is_refused_with_the_pid(
    tiny_model, corpus, tmp_path
):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderLocked, match=f"{out} is in use .*pid {holder.pid} on "):
            run(_cfg(tiny_model, corpus), out)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else written
        assert issubclass(RunFolderLocked, ConfigError)  # the CLI's exit code 2
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the dead holder's lock: the folder is free again.
    with RunLock(out):
        pass


def test_the_lock_is_held_while_a_run_writes_and_released_after(
    tiny_model, corpus, tmp_path, monkeypatch
):
    import saetrain.run.load as load_module  # where run() looks load_lm up

    seen: list[str] = []
    real = load_module.load_lm

    def load_lm(*args, **kwargs):
        with pytest.raises(RunFolderLocked) as e:
            RunLock(tmp_path).acquire()
        seen.append(str(e.value))
        return real(*args, **kwargs)

    monkeypatch.setattr(load_module, "load_lm", load_lm)
    cfg = _cfg(tiny_model, corpus)
    run(replace(cfg, trainer=replace(cfg.trainer, total_tokens=512)), tmp_path)
    assert len(seen) == 1 and f"pid {os.getpid()} on " in seen[0]
    with RunLock(tmp_path):  # released at the end
        pass
    assert (tmp_path / LOCK_FILE).read_bytes() == b""  # no pid left behind


@pytest.mark.parametrize("how", ["folder", "true"])
def test_resume_on_a_finished_run_says_so_and_touches_nothing(
    tiny_model, corpus, tmp_path, capsys, how
):
    cfg = _cfg(tiny_model, corpus)
    out = tmp_path / "run"
    first = run(cfg, out)
    before = _snapshot(out)
    assert any(name.startswith("checkpoints/") for name in before)  # it could resume

    resume = str(out) if how == "folder" else "true"
    again = run(replace(cfg, resume=resume), out if how == "true" else tmp_path / "new")
    assert again.already_finished
    assert f"already finished: {out}" in capsys.readouterr().out
    assert _snapshot(out) == before  # every file byte-identical, none added
    assert not (tmp_path / "new").exists()
    assert again.dictionary_dir == first.dictionary_dir
    assert again.metrics == pytest.approx(first.metrics)


def test_a_new_run_replaces_a_finished_one_and_refuses_an_unfinished_one(
    tiny_model, corpus, tmp_path, monkeypatch
):
    """Old checkpoints in the folder would pass for the new run's (resume takes the newest;
    keep_last deletes the oldest, the new run's own)."""
    cfg = _cfg(tiny_model, corpus)
    run(cfg, tmp_path)  # finished, with checkpoints up to step 12
    _fail_at_step(monkeypatch, 6, RuntimeError("crash"))
    with pytest.raises(RuntimeError, match="crash"):
        run(cfg, tmp_path)  # replaces it: its own checkpoint, step 4, is the only one
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000004.pt"]
    with pytest.raises(ConfigError, match="did not finish .*step-000000004.pt.*resume="):
        run(cfg, tmp_path)  # a fresh run over the unfinished one: refused
    resumed = run(replace(cfg, resume=str(tmp_path)), tmp_path)
    assert not resumed.already_finished
    info = json.loads((resumed.dictionary_dir / "saetrain_run.json").read_text())
    assert info["stream"]["resumed_at_step"] == 4


def test_the_rate_after_a_resume_counts_only_the_tokens_trained_since(
    tiny_model, corpus, tmp_path, monkeypatch
):
    cfg = _cfg(tiny_model, corpus)
    _fail_at_step(monkeypatch, 11, RuntimeError("crash"))
    with pytest.raises(RuntimeError):
        run(cfg, tmp_path)
    monkeypatch.undo()
    clock = itertools.count()
    monkeypatch.setattr(fit_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    resumed = run(replace(cfg, resume=str(tmp_path)), tmp_path)
    stream = json.loads((resumed.dictionary_dir / "saetrain_run.json").read_text())["stream"]
    assert stream["resumed_at_step"] == 8
    # 8 of 16 steps of 256 tokens were trained before the crash; this process trained 2048.
    trained_here = stream["tokens_per_s"] * stream["train_seconds"]
    assert trained_here == pytest.approx(2048, rel=1e-6)
    rows = [
        json.loads(line)
        for line in (resumed.dictionary_dir / "metrics.jsonl").read_text().splitlines()
    ]
    first_after = next(r for r in rows if r.get("step", 0) > 8)
    # The clock ticked once per step since the resume: 4 steps of 256 tokens in 4 "seconds".
    assert first_after["step"] == 12
    assert first_after["tokens_per_s"] == pytest.approx(256)
