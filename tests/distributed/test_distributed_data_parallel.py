"""Data parallel on 2 gloo ranks: the step, a whole run under torchrun, resume, NaN, a lost rank.

The step is checked against one process on the same global rows for every kind of loss (TopK's
batch FVU and AuxK, BatchTopK's batch-wide selection and threshold, the penalty family). Runs use
the tiny local Llama of conftest.py; every spawned world and torchrun call is bounded in time.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saetrain.api import config_from_overrides
from saetrain.config import DictionaryConfig, TrainerConfig
from saetrain.distributed import DistributedError, World, init_world
from saetrain.distributed.data_parallel import DataParallel
from saetrain.distributed.sharding import row_share
from saetrain.errors import ConfigError
from saetrain.training.checkpoint import TrainingDiverged, list_checkpoints
from saetrain.training.fit import prepare_trainer, train_together
from tests.helpers.distributed import _overrides, run_ranks, run_torchrun

D, B, STEPS, INIT = 16, 64, 5, 2
ARCHITECTURES = ("topk", "batchtopk", "matryoshka", "relu", "jumprelu")

# -- one step (five) over the same global rows ------------------------------------------------


def _global_rows() -> torch.Tensor:
    """Rows with structure (sparse combinations of directions, off-centre), fixed by a seed."""
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(24, D, generator=g)
    codes = torch.rand((INIT + STEPS) * B, 24, generator=g).pow(6) * 4
    return codes @ directions + 0.3


def _train(dp: DataParallel, arch: str) -> dict[str, torch.Tensor]:
    """prepare_trainer + train_together as run() calls them, on this rank's share of each
    global batch (all of it in one process)."""
    world = dp.world
    rows = _global_rows()

    def mine(block: torch.Tensor) -> torch.Tensor:
        return block[row_share(len(block), world.world_size, world.rank)]

    dictionary = DictionaryConfig(
        architecture=arch, n_latents=32, k=3, aux_k=6, sparsity_coefficient=0.05
    )
    trainer_cfg = TrainerConfig(
        total_tokens=STEPS * B,
        batch_tokens=B,
        lr=3e-3,
        warmup_steps=1,
        init_batches=INIT,
        dead_after_tokens=B,  # latents die within a step: AuxK and the dead counters take part
    )
    samples = dp.gather(mine(rows[: INIT * B]))  # normalisation scale and b_dec from all ranks
    trainer = prepare_trainer(
        dictionary,
        trainer_cfg,
        samples,
        D,
        D,
        False,
        torch.device("cpu"),
        torch.Generator().manual_seed(1),
    )
    initial = {k: v.clone() for k, v in trainer.dictionary.state_dict().items()}
    batches = iter(rows[INIT * B :].split(B))

    def draw(n: int) -> torch.Tensor:
        local = mine(next(batches))
        assert n == len(local)
        return local

    train_together(
        [trainer], [lambda b: b], dp.batches(draw), 2, stop=dp.stop_agreed(lambda: False)
    )
    out = {k: v.detach().clone() for k, v in trainer.dictionary.state_dict().items()}
    out["tokens_since_fired"] = trainer.tokens_since_fired.clone()
    out["scale"] = torch.tensor(trainer.scale)
    out["moved"] = max((out[k] - initial[k]).abs().max() for k in initial if k.startswith("W_"))
    out["fvu_log"] = torch.tensor([row["fvu"] for row in trainer.state.history])
    return out


def _train_every_architecture() -> dict[str, dict[str, torch.Tensor]]:
    dp = DataParallel(init_world("cpu", timeout_s=60))
    return {arch: _train(dp, arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def one_process_steps() -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return {arch: _train(DataParallel(World()), arch) for arch in ARCHITECTURES}


def test_a_data_parallel_step_equals_the_one_process_step(one_process_steps):
    ranks = run_ranks(_train_every_architecture, 2, timeout_s=120)
    for arch in ARCHITECTURES:
        single = one_process_steps[arch]
        assert single["moved"] > 1e-3, f"{arch}: the weights did not train"
        for r, got in enumerate(ranks):
            for name, expected in single.items():
                diff = (got[arch][name].double() - expected.double()).abs().max().item()
                assert diff <= 1e-6, f"{arch}, rank {r}: {name} differs by {diff:g}"


# -- whole runs under torchrun -----------------------------------------------------------------


def _torchrun(args: list[str], cwd: Path):
    env = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return run_torchrun(["-m", "saetrain", *args], nproc=2, timeout_s=240, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def two_rank_run(tiny_model, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("dp_run")
    out = root / "run"
    done = _torchrun(_overrides(tiny_model, corpus, out), root)
    assert done.returncode == 0, done.stdout[-4000:]
    return out, done.stdout


# One process and two ranks train on the same tokens' activations, in another order (each
# rank's buffer shuffles its own share): on the tiny model the held-out FVUs agree to a few
# thousandths; 0.05 leaves room across platforms and still fails a run that trains on half the
# data, or on one rank's rows only.
FVU_TOLERANCE = 0.05


def test_two_ranks_train_evaluate_and_export_once(two_rank_run, tiny_model, corpus, tmp_path):
    out, stdout = two_rank_run
    assert stdout.count("held-out evaluation:") == 1  # rank 0 prints; rank 1 says nothing
    assert stdout.count("dictionary saved to") == 1
    assert json.loads((out / "finished.json").read_text())["dictionaries"] == ["resid_post.1"]
    info = json.loads((out / "resid_post.1" / "saetrain_run.json").read_text())
    assert info["tokens_seen"] == 2048 and info["steps"] == 8
    assert info["stream"]["world_size"] == 2
    rows = [json.loads(line) for line in (out / "resid_post.1" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if "step" in r and "fvu" in r][:2] == [4, 8]  # logged once
    # The checkpoints: rank 0's shared file and rank 1's own part for each.
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [f"step-{s:09d}{part}.pt" for s in (2, 4, 6) for part in ("", ".rank-1")], names

    one = config_from_overrides(_overrides(tiny_model, corpus, tmp_path / "one"))
    from saetrain.run import run

    single = run(one, tmp_path / "one")
    assert single.metrics["fvu"] < 0.95  # it trained
    two = info["final_metrics"]
    assert abs(two["fvu"] - single.metrics["fvu"]) < FVU_TOLERANCE, (two, single.metrics)
    # The LM ran on the same number of contexts in all (each rank on its own share).
    single_info = json.loads((single.dictionary_dir / "saetrain_run.json").read_text())
    assert info["stream"]["lm_contexts"] == single_info["stream"]["lm_contexts"]


def test_resume_with_two_ranks_continues_exactly(two_rank_run, tiny_model, corpus, tmp_path):
    """A run that died after its step-4 checkpoint, resumed by 2 ranks, ends with the weights
    of the run that was never interrupted."""
    out, _ = two_rank_run
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(out / "checkpoints", crashed / "checkpoints")
    for path in (crashed / "checkpoints").glob("step-000000006*"):
        path.unlink()
    args = _overrides(tiny_model, corpus, crashed, f"resume={crashed}")
    done = _torchrun(args, tmp_path)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "resuming" in done.stdout
    a = load_file(out / "resid_post.1" / "sae_weights.safetensors")
    b = load_file(crashed / "resid_post.1" / "sae_weights.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name


def test_resume_with_another_world_size_is_refused(two_rank_run, tiny_model, corpus, tmp_path):
    out, _ = two_rank_run
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(out / "checkpoints", crashed / "checkpoints")
    cfg = config_from_overrides(_overrides(tiny_model, corpus, crashed, f"resume={crashed}"))
    from saetrain.run import run

    with pytest.raises(ConfigError, match=r"written by 2 rank\(s\), and this run has 1"):
        run(cfg, crashed)
    assert list_checkpoints(crashed)[-1].name == "step-000000006.pt"  # left as it was


def _stop(cfg, out: str) -> tuple[str, list[int]]:
    """run() with SIGTERM reaching rank 1 only, during its third step."""
    import signal

    from saetrain.run import run
    from saetrain.training import trainer as T
    from saetrain.training.checkpoint import TrainingInterrupted

    real = T.Trainer.step

    def step(self, batch):
        if int(os.environ["RANK"]) == 1 and self.state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch)

    T.Trainer.step = step
    try:
        run(cfg, out)
        raise AssertionError("the run was not stopped")
    except TrainingInterrupted as e:
        message = str(e)
    T.Trainer.step = real
    return message, [int(p.name[5:14]) for p in list_checkpoints(out)]


def _resume(cfg, out: str) -> None:
    """The stopped run resumed, as a new launch would (new processes, a new process group: two
    groups one after the other on one rendezvous port can pair with the other's stale store)."""
    import dataclasses

    from saetrain.run import run

    run(dataclasses.replace(cfg, resume=out), out)


def test_a_signal_on_one_rank_stops_both_at_one_checkpoint_and_resumes(
    two_rank_run, tiny_model, corpus, tmp_path
):
    cfg = config_from_overrides(_overrides(tiny_model, corpus, tmp_path))
    results = run_ranks(_stop, 2, (cfg, str(tmp_path)), timeout_s=180)
    run_ranks(_resume, 2, (cfg, str(tmp_path)), timeout_s=180)
    for message, steps in results:
        assert "stopped by a signal after step 3" in message
        assert steps == [2, 3]  # the periodic one, then the stop's: the same on both ranks
    out, _ = two_rank_run
    a = load_file(out / "resid_post.1" / "sae_weights.safetensors")
    b = load_file(tmp_path / "resid_post.1" / "sae_weights.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name


# -- failures: a NaN on one rank, a rank that dies -------------------------------------------


def _run_with(cfg, out: str, failing_rank: int, how: str):
    """run() on every rank; on `failing_rank`, at its third step, a NaN loss or a SIGKILL."""
    import signal

    from saetrain.run import run
    from saetrain.training import trainer as T

    real = T.Trainer.step

    def step(self, batch):
        if int(os.environ["RANK"]) == failing_rank and self.state.step == 2:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "hang":
                time.sleep(300)  # until the harness kills it
            forward = self.dictionary.training_forward

            def nan(*args, **kwargs):
                got = forward(*args, **kwargs)
                got.loss = got.loss * float("nan")
                return got

            self.dictionary.training_forward = nan
        return real(self, batch)

    T.Trainer.step = step
    start = time.monotonic()
    try:
        run(cfg, out)
    except TrainingDiverged as e:
        return "diverged", str(e), time.monotonic() - start
    except DistributedError as e:
        return "distributed", str(e), time.monotonic() - start
    return None, None, time.monotonic() - start


def test_a_nan_on_one_rank_stops_every_rank_with_its_message(tiny_model, corpus, tmp_path):
    cfg = config_from_overrides(_overrides(tiny_model, corpus, tmp_path))
    results = run_ranks(_run_with, 2, (cfg, str(tmp_path), 1, "nan"), timeout_s=120)
    for kind, message, _ in results:
        assert kind == "diverged", message
        assert "rank 1: the loss is nan at step 3" in message and "every rank stopped" in message
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000002.pt"]
    assert not (tmp_path / "resid_post.1" / "sae_weights.safetensors").exists()  # no export


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_killed_or_hung_rank_ends_the_other_with_a_clear_error(tiny_model, corpus, tmp_path, how):
    cfg = config_from_overrides(
        _overrides(tiny_model, corpus, tmp_path, "distributed.timeout_s=15")
    )
    results = run_ranks(_run_with, 2, (cfg, str(tmp_path), 1, how), timeout_s=120, lost=[1])
    kind, message, elapsed = results[0]
    assert kind == "distributed", message
    assert message.startswith("rank 0 of 2: ") and "another rank has probably died" in message
    assert "distributed.timeout_s=15" in message
    assert elapsed < 60  # the timeout (15 s) at most, plus the start
    if how == "hang":
        assert elapsed >= 15  # it waited for the timeout, no longer
    assert not (tmp_path / "resid_post.1" / "sae_weights.safetensors").exists()
