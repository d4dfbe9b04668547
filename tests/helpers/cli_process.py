"""`python -m saetrain` in a child process (optionally patched): the signal and progress tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def finish(child: subprocess.Popen, timeout: float = 120) -> str:
    try:
        rest, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        rest, _ = child.communicate()
        raise AssertionError(f"the child did not stop:\n{rest[-3000:]}") from None
    return rest
