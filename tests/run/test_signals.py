"""Signals through the CLI: SIGTERM / SIGINT outside training name the phase they interrupted
and what was written, with exit 143 / 130; during training the checkpoint's message carries the
exact command that resumes the run, and that command works.

Each test runs `python -m saetrain`'s main() in a subprocess on the tiny Llama of conftest.py,
with one hook patched (a slow LM for the buffer fill, a signal at a training step).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.cli_process import finish, start_cli, tiny_overrides


def wait_for(child: subprocess.Popen, fragment: str, timeout: float = 120) -> str:
    """The child's output up to the first line holding `fragment`."""
    assert child.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        seen.append(line)
        if fragment in line:
            return "".join(seen)
    child.kill()
    raise AssertionError(f"{fragment!r} never appeared:\n{''.join(seen)[-3000:]}")


@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_a_signal_during_the_buffer_fill_names_the_phase(tiny_model, corpus, tmp_path, sig, code):
    out = tmp_path / "run"
    child = start_cli(tiny_overrides(tiny_model, corpus, out), tmp_path, patch="slow_lm")
    before = wait_for(child, "buffer fill: starting")
    child.send_signal(sig)
    text = before + finish(child)
    assert child.returncode == code, text[-3000:]
    assert f"saetrain: {sig.name} during buffer fill (" in text, text[-3000:]
    assert f"no checkpoint and no dictionary was written to {out}" in text
    assert "Traceback" not in text
    assert not (out / "checkpoints").exists()


def test_the_stop_message_prints_a_resume_command_that_works(tiny_model, corpus, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_model, corpus, out)
    child = start_cli(overrides, tmp_path, patch="term_at_step=3")
    text = finish(child)
    assert child.returncode == 3, text[-3000:]
    assert "stopped by a signal after step 3; checkpoint written to" in text
    (line,) = [ln for ln in text.splitlines() if ln.startswith("saetrain: resume with: ")]
    command = shlex.split(line.removeprefix("saetrain: resume with: "))
    assert command[:3] == ["python", "-m", "saetrain"]
    assert command[3:] == [*overrides, f"resume={out.resolve()}"]

    # The printed command, as printed (a fresh Hydra folder under cwd), continues the run.
    resumed = subprocess.run(
        [sys.executable, *command[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resuming {out.resolve()}" in resumed.stdout
    assert (out / "resid_post.1" / "cfg.json").is_file()
