"""Checkpoint and resume: a killed run continues to the same weights, with no token skipped or
repeated; NaN stops a run and keeps the last good checkpoint; a disagreeing config is refused.

Runs the tiny local Llama of conftest.py; the SIGKILL test runs training in a subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from saetrain.config import CacheConfig
from saetrain.errors import ConfigError
from saetrain.export.saelens import load_dictionary
from saetrain.run import run
from saetrain.training import trainer as trainer_module
from saetrain.training.checkpoint import (
    TrainingDiverged,
    TrainingInterrupted,
    list_checkpoints,
    load_checkpoint,
)
from tests.helpers.runs import _cfg, _fail_at_step


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_dictionary(folder).state_dict().items()}


def _assert_same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-6, atol=1e-7, msg=key)


def _run_info(folder: Path) -> dict:
    return json.loads((folder / "saetrain_run.json").read_text())


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_crashed_run_resumes_to_the_same_weights(tiny_model, corpus, tmp_path, monkeypatch, arch):
    cfg = _cfg(tiny_model, corpus, arch)
    whole = run(cfg, tmp_path / "whole")

    _fail_at_step(monkeypatch, 11, RuntimeError("crash"))
    with pytest.raises(RuntimeError, match="crash"):
        run(cfg, tmp_path / "broken")
    monkeypatch.undo()
    saved = list_checkpoints(tmp_path / "broken")
    assert [p.name for p in saved] == ["step-000000004.pt", "step-000000008.pt"]

    resumed = run(replace(cfg, resume=str(tmp_path / "broken")), tmp_path / "elsewhere")
    assert resumed.output_dir == tmp_path / "broken"
    _assert_same(whole.dictionary_dir, resumed.dictionary_dir)
    a, b = _run_info(whole.dictionary_dir), _run_info(resumed.dictionary_dir)
    assert a["tokens_seen"] == b["tokens_seen"] == 4096
    assert b["stream"]["resumed_at_step"] == 8
    # The data position: the resumed stream ends exactly where the whole run's ended.
    assert a["stream"]["position"] == b["stream"]["position"]
    assert resumed.metrics["fvu"] == pytest.approx(whole.metrics["fvu"], rel=1e-6)
    # metrics.jsonl continues: the first run's rows up to its crash, then the resumed rows.
    steps = [
        json.loads(line).get("step")
        for line in (resumed.dictionary_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps[-1] is None and 16 in steps


_CHILD = """
import sys
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.helpers.runs import _cfg
from saetrain.run import run
cfg = _cfg(Path({model!r}), Path({corpus!r}))
cfg = replace(cfg, trainer=replace(cfg.trainer, total_tokens=65536),
              checkpoint=replace(cfg.checkpoint, every_tokens=2048))
run(cfg, Path({out!r}))
"""


def test_sigkill_in_the_middle_then_resume(tiny_model, corpus, tmp_path):
    """A run killed with SIGKILL mid-training resumes to the uninterrupted run's weights."""
    out = tmp_path / "killed"
    script = _CHILD.format(
        root=str(Path(__file__).resolve().parents[2]),
        model=str(tiny_model),
        corpus=str(corpus),
        out=str(out),
    )
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list_checkpoints(out) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert list_checkpoints(out), child.stderr.read().decode()[-2000:] if child.stderr else ""
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (out / "resid_post.1" / "cfg.json").exists()  # it never finished
    killed_at = load_checkpoint(list_checkpoints(out)[-1])["step"]
    assert 0 < killed_at < 256

    cfg = _cfg(tiny_model, corpus)
    cfg = replace(
        cfg,
        trainer=replace(cfg.trainer, total_tokens=65536),
        checkpoint=replace(cfg.checkpoint, every_tokens=2048),
    )
    torch.set_num_threads(1)
    try:
        resumed = run(replace(cfg, resume=str(out)), out)
        whole = run(cfg, tmp_path / "whole")
    finally:
        torch.set_num_threads(max(os.cpu_count() or 1, 1))
    _assert_same(whole.dictionary_dir, resumed.dictionary_dir)
    a, b = _run_info(whole.dictionary_dir), _run_info(resumed.dictionary_dir)
    assert a["tokens_seen"] == b["tokens_seen"] == 65536
    assert a["stream"]["position"] == b["stream"]["position"]


def test_sigterm_writes_a_checkpoint_and_stops(tiny_model, corpus, tmp_path, monkeypatch):
    cfg = _cfg(tiny_model, corpus)
    real = trainer_module.Trainer.step
    calls = [0]

    def step(self, batch):
        calls[0] += 1
        if calls[0] == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch)

    monkeypatch.setattr(trainer_module.Trainer, "step", step)
    with pytest.raises(TrainingInterrupted, match="after step 6; checkpoint written to .*step-"):
        run(cfg, tmp_path / "a")
    monkeypatch.undo()
    assert load_checkpoint(list_checkpoints(tmp_path / "a")[-1])["step"] == 6
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = run(replace(cfg, resume=str(tmp_path / "a")), tmp_path / "a")
    whole = run(cfg, tmp_path / "whole")
    _assert_same(whole.dictionary_dir, resumed.dictionary_dir)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    tiny_model, corpus, tmp_path, monkeypatch
):
    cfg = _cfg(tiny_model, corpus)
    from saetrain.dictionaries.topk import TopKSAE

    real = TopKSAE.training_forward
    calls = [0]

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 10:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(TopKSAE, "training_forward", forward)
    with pytest.raises(TrainingDiverged, match="the loss is nan at step 10"):
        run(cfg, tmp_path)
    saved = list_checkpoints(tmp_path)
    assert saved[-1].name == "step-000000008.pt"
    state = load_checkpoint(saved[-1])
    weights = state["trainers"][0]["dictionary"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_resume_with_a_disagreeing_config_lists_the_differences(
    tiny_model, corpus, tmp_path, monkeypatch
):
    cfg = _cfg(tiny_model, corpus)
    _fail_at_step(monkeypatch, 6, RuntimeError("crash"))
    with pytest.raises(RuntimeError):
        run(cfg, tmp_path)
    monkeypatch.undo()
    other = replace(
        cfg,
        resume=str(tmp_path),
        dictionary=replace(cfg.dictionary, architecture="relu", n_latents=128),
        eval=replace(cfg.eval, n_tokens=128),  # may differ: not listed
    )
    with pytest.raises(ConfigError) as e:
        run(other, tmp_path)
    message = str(e.value)
    assert "dictionary.architecture: 'topk' → 'relu'" in message
    assert "dictionary.n_latents: 64 → 128" in message
    assert "eval." not in message


def test_resume_without_a_checkpoint_is_named(tmp_path, tiny_model, corpus):
    cfg = replace(_cfg(tiny_model, corpus), resume=str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="resume=.*no checkpoint in"):
        run(cfg, tmp_path)


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(
    tiny_model, corpus, tmp_path, monkeypatch
):
    cfg = _cfg(tiny_model, corpus)
    import saetrain.training.checkpoint as checkpoint_module

    real_save = torch.save
    calls = [0]

    def full_disk(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            f.write(b"partial bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run(cfg, tmp_path)
    monkeypatch.undo()
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000000004.pt"]
    assert load_checkpoint(folder / "step-000000004.pt")["step"] == 4


def test_a_killed_cache_writer_resumes_without_duplicating_the_cache(
    tiny_model, corpus, tmp_path, monkeypatch
):
    cfg = replace(
        _cfg(tiny_model, corpus), cache=CacheConfig(dir=str(tmp_path / "cache"), shard_tokens=300)
    )
    whole = run(replace(cfg, cache=CacheConfig()), tmp_path / "whole")
    _fail_at_step(monkeypatch, 11, RuntimeError("crash"))
    with pytest.raises(RuntimeError):
        run(cfg, tmp_path / "a")
    monkeypatch.undo()
    resumed = run(replace(cfg, resume=str(tmp_path / "a")), tmp_path / "a")
    _assert_same(whole.dictionary_dir, resumed.dictionary_dir)
    (key_dir,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    manifest = json.loads((key_dir / "manifest.json").read_text())
    cached_contexts = sum(s["contexts"] for s in manifest["shards"])
    # Exactly the stream the whole run used, once: nothing cached twice, nothing missing.
    assert cached_contexts == _run_info(whole.dictionary_dir)["stream"]["lm_contexts"]
