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
from pathlib import Path

import pytest

# main() under the patch SAETRAIN_TEST_PATCH names, with this script's arguments as overrides.
DRIVER = """
import os, signal, sys, time
patch = os.environ.get("SAETRAIN_TEST_PATCH", "")
if patch == "slow_lm":
    from saetrain.activations import source
    real_call = source.ActivationSource.__call__
    def slow(self, input_ids):
        time.sleep(0.5)
        return real_call(self, input_ids)
    source.ActivationSource.__call__ = slow
elif patch.startswith("term_at_step="):
    from saetrain.training import trainer
    real_step = trainer.Trainer.step
    at, calls = int(patch.split("=")[1]), [0]
    def step(self, batch):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, batch)
    trainer.Trainer.step = step
sys.argv = ["saetrain", *sys.argv[1:]]
from saetrain.__main__ import main
main()
"""


def tiny_overrides(tiny_model: Path, corpus: Path, out: Path) -> list[str]:
    """Command-line overrides for a seconds-long run on the tiny model (test_run's config)."""
    return [
        f"model.name={tiny_model}",
        "model.gguf_package=null",
        "model.device=cpu",
        f"data.data_files=[{corpus}/*.txt]",
        "data.context_size=16",
        "data.holdout_percent=10",
        "site.input=resid_post.1",
        "buffer.size_tokens=1024",
        "buffer.lm_batch_contexts=8",
        "dictionary.n_latents=64",
        "dictionary.k=4",
        "trainer.total_tokens=2048",
        "trainer.batch_tokens=256",
        "trainer.lr=1e-3",
        "trainer.warmup_steps=2",
        "trainer.init_batches=2",
        "eval.n_tokens=256",
        "eval.batch_contexts=8",
        "eval.ce_contexts=8",
        "logger.log_every=4",
        f"output_dir={out}",
    ]


def start_cli(
    args: list[str], cwd: Path, patch: str = "", hydra_dir: Path | None = None
) -> subprocess.Popen:
    driver = cwd / "driver.py"
    driver.write_text(DRIVER)
    env = os.environ | {
        "SAETRAIN_TEST_PATCH": patch,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    hydra_run = [f"hydra.run.dir={hydra_dir or cwd / 'hydra'}"]
    return subprocess.Popen(
        [sys.executable, str(driver), *args, *hydra_run],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


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


def finish(child: subprocess.Popen, timeout: float = 120) -> str:
    try:
        rest, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        rest, _ = child.communicate()
        raise AssertionError(f"the child did not stop:\n{rest[-3000:]}") from None
    return rest


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
