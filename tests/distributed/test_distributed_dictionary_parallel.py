"""Dictionary parallel on 2 gloo ranks: several dictionaries from one stream, each trained by one
rank on the rows of every rank (exchanged with all_to_all), as in one process.

Every spawned world and torchrun call is bounded in time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saetrain.api import config_from_overrides
from saetrain.config import DictionaryConfig, TrainerConfig
from saetrain.distributed import World, init_world
from saetrain.distributed.data_parallel import DataParallel
from saetrain.distributed.sharding import dictionary_cost, row_share
from saetrain.errors import ConfigError
from saetrain.training.fit import prepare_trainer, train_together
from tests.helpers.distributed import _overrides, run_ranks, run_torchrun

D, B, STEPS, INIT = 8, 32, 4, 2
# Three sites side by side in each row; three dictionaries on them: two SAEs and a transcoder
# that reads site 0 and predicts site 2 (two column ranges), of different sizes.
COLUMNS = [[slice(0, D)], [slice(D, 2 * D)], [slice(0, D), slice(2 * D, 3 * D)]]
SPECS = [("topk", 32, False), ("batchtopk", 16, False), ("relu", 24, True)]


def _rows() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(12, 3 * D, generator=g)
    codes = torch.rand((INIT + STEPS) * B, 12, generator=g).pow(4) * 3
    return codes @ directions + 0.2


def _view(i: int):
    return lambda rows: torch.cat([rows[:, c] for c in COLUMNS[i]], dim=-1)


def _train(dp: DataParallel) -> dict[int, dict[str, torch.Tensor]]:
    """Three dictionaries as run() trains them: this rank's own, on the exchanged batches."""
    world = dp.world
    rows = _rows()

    def mine(block: torch.Tensor) -> torch.Tensor:
        return block[row_share(len(block), world.world_size, world.rank)]

    dp.own([dictionary_cost(n, D, D) for _, n, _ in SPECS])
    samples = dp.gather(mine(rows[: INIT * B]))
    trainer_cfg = TrainerConfig(
        total_tokens=STEPS * B, batch_tokens=B, lr=3e-3, warmup_steps=1, init_batches=INIT
    )
    owned, trainers, steps = [], [], {}
    for i, (arch, n, transcoder) in enumerate(SPECS):
        if not dp.mine(i):
            continue
        cfg = DictionaryConfig(architecture=arch, n_latents=n, k=2, sparsity_coefficient=0.05)
        trainer = prepare_trainer(
            cfg,
            trainer_cfg,
            _view(i)(samples),
            D,
            D,
            transcoder,
            torch.device("cpu"),
            torch.Generator().manual_seed(10 + i),
        )
        real = trainer.step

        def counted(batch, i=i, real=real):
            steps[i] = steps.get(i, 0) + 1
            return real(batch)

        trainer.step = counted
        owned.append(i)
        trainers.append(trainer)
    batches = iter(rows[INIT * B :].split(B))
    train_together(
        trainers,
        [_view(i) for i in owned],
        dp.batches(lambda n: mine(next(batches)), COLUMNS),
        2,
        stop=dp.stop_agreed(lambda: False),
    )
    out = {}
    for i, trainer in zip(owned, trainers, strict=True):
        out[i] = {k: v.detach().clone() for k, v in trainer.dictionary.state_dict().items()}
        out[i]["steps"] = torch.tensor(steps[i])
        out[i]["scale"] = torch.tensor([trainer.scale, trainer.target_scale])
    return out


def _train_on_rank() -> dict[int, dict[str, torch.Tensor]]:
    return _train(DataParallel(init_world("cpu", timeout_s=60)))


def test_each_dictionary_is_trained_once_and_ends_as_in_one_process():
    single = _train(DataParallel(World()))
    ranks = run_ranks(_train_on_rank, 2, timeout_s=120)
    owners = {i: [r for r, got in enumerate(ranks) if i in got] for i in range(len(SPECS))}
    assert all(len(o) == 1 for o in owners.values()), owners  # trained exactly once
    assert all(ranks), "a rank trained nothing"
    for i, (rank,) in owners.items():
        got = ranks[rank][i]
        assert int(got["steps"]) == STEPS
        for name, expected in single[i].items():
            diff = (got[name].double() - expected.double()).abs().max().item()
            assert diff <= 1e-6, f"dictionary {i} ({SPECS[i][0]}) on rank {rank}: {name}: {diff:g}"


def _exchange_on_rank():
    """One global batch in each storage dtype, gathered (one dictionary) and exchanged (three)."""
    dp = DataParallel(init_world("cpu", timeout_s=60))
    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        mine = _rows()[:B].to(dtype)[row_share(B, 2, dp.world.rank)]
        dp.own([1.0])
        out["gather", dtype] = dp.batches(lambda n, mine=mine: mine)(B)
        dp.own([dictionary_cost(n, D, D) for _, n, _ in SPECS])
        out["exchange", dtype] = dp.batches(lambda n, mine=mine: mine, COLUMNS)(B)
    return out, dp.owners


def test_the_exchange_gives_each_rank_its_columns_of_every_row_bit_for_bit():
    for rank, (got, owners) in enumerate(run_ranks(_exchange_on_rank, 2, timeout_s=60)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            rows = _rows()[:B].to(dtype)
            assert torch.equal(got["gather", dtype], rows)
            expected = torch.zeros_like(rows)
            for i, owner in enumerate(owners):
                if owner == rank:
                    for c in COLUMNS[i]:
                        expected[:, c] = rows[:, c]
            assert got["exchange", dtype].dtype == dtype
            assert torch.equal(got["exchange", dtype], expected), (rank, dtype)


def test_fewer_dictionaries_than_ranks_is_refused():
    dp = DataParallel(World(rank=0, world_size=3))
    with pytest.raises(ConfigError, match="2 dictionaries on 3 ranks"):
        dp.own([1.0, 2.0])
    dp.own([1.0])  # one dictionary: every rank trains it (data parallel)
    assert dp.owners is None and dp.mine(0) and dp.writes(0)


NAMES = ["resid_post.1", "resid_post.2", "mlp_in.1-mlp_out.1"]
ENTRIES = (
    "dictionaries=[{site:{input:resid_post.1}},{site:{input:resid_post.2}},"
    "{site:{input:mlp_in.1,target:mlp_out.1},dictionary:{n_latents:32}}]"
)


def _torchrun(args: list[str], cwd: Path):
    env = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return run_torchrun(["-m", "saetrain", *args], nproc=2, timeout_s=240, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def three_dictionaries(tiny_model, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("dictionary_parallel")
    out = root / "run"
    args = _overrides(tiny_model, corpus, out, ENTRIES)
    config_from_overrides(args)  # the overrides compose
    done = _torchrun(args, root)
    assert done.returncode == 0, done.stdout[-4000:]
    return out, done.stdout


def test_three_dictionaries_under_torchrun(three_dictionaries):
    out, stdout = three_dictionaries
    assert json.loads((out / "finished.json").read_text())["dictionaries"] == NAMES
    for name in NAMES:
        assert stdout.count(f"dictionary saved to {out / name}") == 1  # by its owner, once
        info = json.loads((out / name / "saetrain_run.json").read_text())
        assert info["tokens_seen"] == 2048 and info["final_metrics"]["fvu"] < 1.0
    # Each checkpoint: rank 0's file and rank 1's part, each holding its own dictionaries.
    last = sorted((out / "checkpoints").glob("step-*.pt"))
    assert [p.name for p in last][-2:] == ["step-000000006.pt", "step-000000006.rank-1.pt"]
    shared = torch.load(last[-2], weights_only=True)
    part = torch.load(last[-1], weights_only=True)
    held = [
        (a is not None, b is not None)
        for a, b in zip(shared["trainers"], part["trainers"], strict=True)
    ]
    assert all(x != y for x, y in held), held  # each state in exactly one of the two


def test_three_dictionaries_resume_exactly(three_dictionaries, tiny_model, corpus, tmp_path):
    """Resumed after its step-4 checkpoint, each rank takes its own dictionaries' states back
    and every dictionary ends as in the uninterrupted run."""
    out, _ = three_dictionaries
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(out / "checkpoints", crashed / "checkpoints")
    for path in (crashed / "checkpoints").glob("step-000000006*"):
        path.unlink()
    done = _torchrun(
        _overrides(tiny_model, corpus, crashed, ENTRIES, f"resume={crashed}"), tmp_path
    )
    assert done.returncode == 0, done.stdout[-4000:]
    for name in NAMES:
        a = load_file(out / name / "sae_weights.safetensors")
        b = load_file(crashed / name / "sae_weights.safetensors")
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), (name, key)
