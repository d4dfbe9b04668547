"""Latent sharding on 2 gloo ranks: one dictionary's latents split over the ranks trains, saves
and resumes exactly as the same dictionary whole in one process.

Every spawned world is bounded in time.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from saetrain.config import DictionaryConfig, TrainerConfig
from saetrain.distributed import World, init_world
from saetrain.distributed.data_parallel import DataParallel
from saetrain.distributed.sharding import row_share
from saetrain.errors import ConfigError
from saetrain.training.fit import fold, prepare_trainer, restore_trainer, train_together
from saetrain.training.latent_shard import LatentShard, ShardedTrainer
from tests.helpers.distributed import _torchrun, run_ranks

D, B, STEPS, INIT, N_LATENTS = 16, 64, 6, 2, 64
ARCHITECTURES = ("topk", "batchtopk")
# The penalty family: its own training_forward, with its sums over latents made whole.
PENALTY = ("relu", "jumprelu", "gated")


def _global_rows() -> torch.Tensor:
    """Rows with structure (sparse combinations of directions, off-centre), fixed by a seed."""
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(24, D, generator=g)
    codes = torch.rand((INIT + STEPS) * B, 24, generator=g).pow(6) * 4
    return codes @ directions + 0.3


def _configs(arch: str, transcoder: bool = False) -> tuple[DictionaryConfig, TrainerConfig]:
    dictionary = DictionaryConfig(
        architecture=arch,
        n_latents=N_LATENTS,
        k=2,
        aux_k=6,
        skip=transcoder,
        sparsity_coefficient=0.05,
        # JumpReLU: λ steered towards an L0 (the global one), and the pre-activation loss
        target_l0=8.0 if arch == "jumprelu" else None,
        jumprelu_pre_act_coefficient=0.1 if arch == "jumprelu" else 0.0,
    )
    trainer = TrainerConfig(
        total_tokens=STEPS * B,
        batch_tokens=B,
        lr=1e-2,
        warmup_steps=1,
        init_batches=INIT,
        dead_after_tokens=B,  # latents die within a step: AuxK and the dead counters take part
        grad_clip=0.1,  # below every step's norm (0.14-0.18): the global norm takes part
    )
    return dictionary, trainer


def _train(
    dp: DataParallel,
    arch: str,
    sharded: bool,
    transcoder: bool = False,
    stop_after: int | None = None,
    state: dict | None = None,
) -> dict:
    """prepare_trainer (or restore_trainer) + train_together as run() calls them, on this rank's
    share of each global batch; returns the whole dictionary (on rank 0), its counters and log."""
    world = dp.world
    rows = _global_rows()
    if transcoder:  # predict a fixed function of x: [x, y] side by side
        rows = torch.cat([rows, torch.tanh(rows.flip(1)) * 2], dim=1)
    width = rows.shape[1]

    def mine(block: torch.Tensor) -> torch.Tensor:
        return block[row_share(len(block), world.world_size, world.rank)]

    dict_cfg, trainer_cfg = _configs(arch, transcoder)
    shard = LatentShard(world, N_LATENTS) if sharded else None
    if state is None:
        samples = dp.gather(mine(rows[: INIT * B]))
        trainer = prepare_trainer(
            dict_cfg,
            trainer_cfg,
            samples,
            D,
            width - D if transcoder else D,
            transcoder,
            torch.device("cpu"),
            torch.Generator().manual_seed(1),
            shard=shard,
        )
    else:
        trainer = restore_trainer(
            dict_cfg, trainer_cfg, state, D, D, False, torch.device("cpu"), shard=shard
        )
    done = trainer.state.step
    batches = iter(rows[INIT * B + done * B :].split(B))
    next_batch = dp.batches(lambda n: mine(next(batches)))
    if stop_after is not None:
        for _ in range(stop_after - done):
            y, out = trainer.step(next_batch(B))
            trainer.maybe_log(y, out, 2, 1.0)
        return {"state": trainer.state_dict()}
    train_together([trainer], [lambda b: b], next_batch, 2, stop=dp.stop_agreed(lambda: False))
    fitted = fold(trainer)
    if isinstance(trainer, ShardedTrainer):
        gathered = trainer.gathered(fitted)
        if gathered is None:
            return {}
        fitted = gathered
    out = {k: v.detach().clone() for k, v in fitted.exported.state_dict().items()}
    out["tokens_since_fired"] = fitted.tokens_since_fired
    out["log"] = torch.tensor(
        [[row[k] for k in ("loss", "fvu", "l0", "dead_fraction")] for row in trainer.state.history]
    )
    out["lr"] = torch.tensor(trainer.base_lr)
    return out


def _on_rank(*args) -> dict:
    return _train(DataParallel(init_world("cpu", timeout_s=60)), *args)


def _assert_same(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys(), (what, got.keys(), expected.keys())
    for name, value in expected.items():
        diff = (got[name].double() - value.double()).abs()
        if name == "log":  # losses of order 10-60 (the penalty family's first steps): relative
            diff = diff / value.double().abs().clamp_min(1.0)
        assert diff.max().item() <= 1e-6, f"{what}: {name} differs by {diff.max().item():g}"


@pytest.fixture(scope="module")
def one_process() -> dict:
    return {arch: _train(DataParallel(World()), arch, False) for arch in ARCHITECTURES + PENALTY}


def _every_case() -> dict:
    dp = DataParallel(init_world("cpu", timeout_s=60))
    out = {arch: _train(dp, arch, True) for arch in ARCHITECTURES + PENALTY}
    out["skip transcoder"] = _train(dp, "topk", True, True)
    return out


def test_a_two_way_sharded_step_equals_the_whole_dictionary(one_process):
    first, second = run_ranks(_every_case, 2, timeout_s=180)
    assert all(not got for got in second.values())  # rank 1 hands its shard to rank 0
    for arch in ARCHITECTURES:
        single = one_process[arch]
        # it trained, and AuxK had dead latents to work on at every logged step (loss > FVU)
        assert single["log"][-1, 1] < single["log"][0, 1] - 0.02
        assert (single["log"][:, 0] > single["log"][:, 1]).all() and (single["log"][:, 3] > 0).all()
        _assert_same(first[arch], single, arch)
    for arch in PENALTY:
        single = one_process[arch]
        assert single["log"][-1, 1] < single["log"][0, 1] - 0.02, arch  # it trained
        _assert_same(first[arch], single, arch)
    transcoder = _train(DataParallel(World()), "topk", False, True)
    assert "W_skip" in transcoder
    _assert_same(first["skip transcoder"], transcoder, "skip transcoder")


def test_one_rank_sharded_is_the_unsharded_dictionary(one_process):
    got = _train(DataParallel(World()), "batchtopk", True)
    _assert_same(got, one_process["batchtopk"], "batchtopk, 1 shard")


def _stop_and_resume(arch: str) -> dict:
    dp = DataParallel(init_world("cpu", timeout_s=60))
    state = _train(dp, arch, True, False, 3)["state"]
    state = torch.load(_roundtrip(state), weights_only=True)  # as a checkpoint holds it
    assert state["latent_shard"]["rank"] == dp.world.rank
    return _train(dp, arch, True, False, None, state)


def _roundtrip(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_a_sharded_state_resumes_exactly(one_process):
    first, _ = run_ranks(_stop_and_resume, 2, ("batchtopk",), timeout_s=120)
    _assert_same(first, one_process["batchtopk"], "batchtopk resumed")


def test_a_sharded_state_is_refused_unsharded_and_by_another_rank():
    dp = DataParallel(World())
    state = _train(dp, "topk", True, False, 1)["state"]
    dict_cfg, trainer_cfg = _configs("topk")
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="distributed.shard_latents=true"):
        restore_trainer(dict_cfg, trainer_cfg, state, D, D, False, cpu)
    state["latent_shard"]["rank"] = 1
    with pytest.raises(ConfigError, match="resume with the run's distributed.shard_latents"):
        restore_trainer(
            dict_cfg, trainer_cfg, state, D, D, False, cpu, shard=LatentShard(World(), N_LATENTS)
        )


def test_a_width_that_does_not_split_is_refused():
    with pytest.raises(ConfigError, match=r"n_latents=33 does not split evenly over 2 ranks"):
        LatentShard(World(rank=0, world_size=2), 33)


def test_the_gathered_export_writes_the_files_of_the_unsharded_one(one_process, tmp_path):
    """save_dictionary of the gathered BatchTopK and of the whole one: the same cfg.json and the
    same tensors (BatchTopK's threshold expanded to every latent) to 1e-6."""
    from saetrain.dictionaries import BatchTopKSAE
    from saetrain.export.saelens import save_dictionary

    folders = []
    for name, state in (
        ("sharded", _train(DataParallel(World()), "batchtopk", True)),
        ("whole", one_process["batchtopk"]),
    ):
        dictionary = BatchTopKSAE(D, N_LATENTS, D, k=2)
        dictionary.load_state_dict({k: v for k, v in state.items() if k in dictionary.state_dict()})
        folders.append(save_dictionary(dictionary, tmp_path / name, {"model_name": "m"}))
    a, b = (load_file(f / "sae_weights.safetensors") for f in folders)
    assert a.keys() == b.keys() and a["threshold"].shape == (N_LATENTS,)
    _assert_same(a, b, "exported tensors")
    assert (folders[0] / "cfg.json").read_text() == (folders[1] / "cfg.json").read_text()


# -- a whole run under torchrun ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_run(tiny_model, corpus, tmp_path_factory):
    from tests.helpers.distributed import _overrides

    root = tmp_path_factory.mktemp("latent_shard_run")
    out = root / "run"
    done = _torchrun(_overrides(tiny_model, corpus, out, "distributed.shard_latents=true"), root)
    assert done.returncode == 0, done.stdout[-4000:]
    return out, done.stdout


def test_a_sharded_run_trains_evaluates_and_exports_once(sharded_run):
    out, stdout = sharded_run
    assert stdout.count("held-out evaluation:") == 1 and stdout.count("dictionary saved to") == 1
    assert "latent shard: 32 per rank" in stdout and "memory of rank 1: weights" in stdout
    info = json.loads((out / "resid_post.1" / "saetrain_run.json").read_text())
    assert info["tokens_seen"] == 2048 and info["stream"]["world_size"] == 2
    assert info["final_metrics"]["fvu"] < 0.95  # it trained
    assert 0 <= info["final_metrics"]["dead_fraction"] <= 1
    # rank 0 evaluated the gathered dictionary: one process evaluating the export agrees
    from saetrain.evaluate import evaluate_path

    again = evaluate_path(out / "resid_post.1", ["model.device=cpu"]).metrics
    for key in ("fvu", "l0", "never_fired_fraction", "ce_spliced", "kl_div"):
        got, expected = info["final_metrics"][key], again[key]
        assert abs(got - expected) <= 1e-5 * max(1.0, abs(expected)), (key, got, expected)
    weights = load_file(out / "resid_post.1" / "sae_weights.safetensors")
    assert weights["W_enc"].shape[1] == 64 and weights["W_dec"].shape[0] == 64
    # Each checkpoint: rank 0's file and rank 1's part, each with its own half of the latents.
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [f"step-{s:09d}{part}.pt" for s in (2, 4, 6) for part in ("", ".rank-1")]
    for rank, name in enumerate(names[-2:]):
        (state,) = torch.load(out / "checkpoints" / name, weights_only=True)["trainers"]
        assert state["latent_shard"] == {"rank": rank, "world_size": 2, "n_latents": 64}
        assert state["dictionary"]["W_dec"].shape[0] == 32
        assert state["optimizer"]["state"][2]["exp_avg"].shape[0] == 32  # W_dec's Adam state


def test_a_sharded_run_exports_the_unsharded_run_s_dictionary(
    sharded_run, tiny_model, corpus, tmp_path
):
    """The same run data parallel (every rank the whole dictionary) ends with the same weights:
    the ranks' global batches are the same, and the sharded step is the whole one."""
    from tests.helpers.distributed import _overrides

    out, _ = sharded_run
    done = _torchrun(_overrides(tiny_model, corpus, tmp_path / "whole"), tmp_path)
    assert done.returncode == 0, done.stdout[-4000:]
    a = load_file(out / "resid_post.1" / "sae_weights.safetensors")
    b = load_file(tmp_path / "whole" / "resid_post.1" / "sae_weights.safetensors")
    _assert_same(a, b, "exported tensors")
    cfg_a = json.loads((out / "resid_post.1" / "cfg.json").read_text())
    cfg_b = json.loads((tmp_path / "whole" / "resid_post.1" / "cfg.json").read_text())
    assert cfg_a == cfg_b


def test_a_sharded_run_resumes_exactly(sharded_run, tiny_model, corpus, tmp_path):
    from tests.helpers.distributed import _overrides

    out, _ = sharded_run
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(out / "checkpoints", crashed / "checkpoints")
    for path in (crashed / "checkpoints").glob("step-000000006*"):
        path.unlink()
    args = _overrides(
        tiny_model, corpus, crashed, "distributed.shard_latents=true", f"resume={crashed}"
    )
    done = _torchrun(args, tmp_path)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "resuming" in done.stdout
    a = load_file(out / "resid_post.1" / "sae_weights.safetensors")
    b = load_file(crashed / "resid_post.1" / "sae_weights.safetensors")
    _assert_same(a, b, "resumed export")


# -- what is refused, before the LM loads ---------------------------------------------------------


def _refused(cfg, out: str) -> str:
    """run() with an LM that must not load; the ConfigError's message."""
    import saetrain.run as R
    import saetrain.run.load as load_module  # where run() looks load_lm up

    def no_lm(*args, **kwargs):
        raise AssertionError("the LM was loaded before the config was refused")

    real, load_module.load_lm = load_module.load_lm, no_lm
    try:
        R.run(cfg, out)
    except ConfigError as e:
        return str(e)
    finally:
        load_module.load_lm = real  # later tests load it
    raise AssertionError("not refused")


def test_a_width_that_does_not_split_over_the_ranks_is_refused(tiny_model, corpus, tmp_path):
    from saetrain.api import config_from_overrides
    from tests.helpers.distributed import _overrides

    args = _overrides(
        tiny_model, corpus, tmp_path, "distributed.shard_latents=true", "dictionary.n_latents=63"
    )
    cfg = config_from_overrides(args)
    for message in run_ranks(_refused, 2, (cfg, str(tmp_path)), timeout_s=60):
        assert message == (
            "dictionary.n_latents=63 does not split evenly over 2 ranks "
            "(distributed.shard_latents=true); choose a multiple of 2"
        )


def test_an_architecture_it_cannot_split_is_refused_with_exit_code_2(tiny_model, corpus, tmp_path):
    import subprocess
    import sys

    from saetrain.api import config_from_overrides
    from tests.helpers.distributed import _overrides

    args = _overrides(
        tiny_model, corpus, tmp_path, "distributed.shard_latents=true",
        "dictionary.architecture=matryoshka", "dictionary.matryoshka_prefixes=[16,64]",
    )  # fmt: skip
    expected = (
        "dictionary.architecture='matryoshka' cannot be split over ranks "
        "(distributed.shard_latents=true); choose one of: topk, batchtopk, relu, gated, "
        "jumprelu, or set distributed.shard_latents=false"
    )
    assert _refused(config_from_overrides(args), str(tmp_path)) == expected
    proc = subprocess.run(
        [sys.executable, "-m", "saetrain", *args],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]
