"""The distributed room's foundation: the World, the collectives on 2 gloo ranks, the shares.

Each multi-rank test spawns 2 CPU processes (tests/helpers/distributed.py) bounded in time; the
collectives are checked in one spawned world, with real numbers, to keep the start-up cost once.
"""

from __future__ import annotations

import sys
import textwrap
import time

import pytest
import torch

from saetrain.distributed import DistributedError, World, close_world, init_world
from saetrain.distributed import collectives as C
from saetrain.distributed import sharding as S
from saetrain.distributed.world import choose_device, launched_ranks
from saetrain.errors import ConfigError
from tests.helpers.distributed import RanksFailed, run_ranks, run_torchrun

# -- world size 1: no process group, no torch.distributed call -------------------------------


def test_world_of_one_never_touches_torch_distributed(monkeypatch):
    import torch.distributed as dist

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.distributed was called at world size 1")

    for name in (
        "init_process_group",
        "all_reduce",
        "broadcast",
        "broadcast_object_list",
        "all_gather",
        "all_gather_object",
        "all_to_all_single",
        "monitored_barrier",
        "new_group",
        "destroy_process_group",
    ):
        monkeypatch.setattr(dist, name, forbidden)
    world = init_world("cpu", env={})
    assert (world.rank, world.world_size, world.is_main, world.distributed) == (0, 1, True, False)
    assert world.backend is None and world.tag() == ""
    x = torch.arange(3.0)
    assert C.all_reduce_(world, x) is x and x.tolist() == [0.0, 1.0, 2.0]
    assert C.all_reduce_mean_(world, x) is x
    assert C.all_reduce_many_(world, [x]) == [x]
    assert C.all_reduce_metrics(world, {"a": 1.5}) == {"a": 1.5}
    assert C.flagged_ranks(world, True) == [0] and C.flagged_ranks(world, False) == []
    assert C.broadcast_object(world, {"k": 1}) == {"k": 1}
    assert C.broadcast_(world, x) is x
    assert C.all_gather_objects(world, 7) == [7]
    assert C.all_gather_rows(world, x)[0] is x
    assert C.all_to_all(world, [x])[0] is x
    C.barrier(world, "start")
    close_world(world)
    # torchrun --nproc-per-node=1 is world size 1 too: still no process group.
    one = init_world("cpu", env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert one == World(device=torch.device("cpu"))


def test_world_size_one_rejects_bad_arguments_like_a_real_world():
    world = World()
    with pytest.raises(ValueError, match="reduce op"):
        C.all_reduce_(world, torch.zeros(1), "avg")
    with pytest.raises(TypeError, match="floating"):
        C.all_reduce_mean_(world, torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="2 tensors for 1 ranks"):
        C.all_to_all(world, [torch.zeros(1), torch.zeros(1)])


def test_launcher_variables_are_checked():
    assert launched_ranks({}) == (0, 1, 0, 1)
    assert launched_ranks(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    ) == (3, 4, 1, 2)
    with pytest.raises(ConfigError, match="WORLD_SIZE not"):
        launched_ranks({"RANK": "0"})
    with pytest.raises(ConfigError, match="does not fit"):
        launched_ranks({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="not an integer"):
        launched_ranks({"RANK": "x", "WORLD_SIZE": "2"})


def test_device_per_rank():
    assert choose_device("cpu", 1, 2) == torch.device("cpu")
    with pytest.raises(ConfigError, match="choose one of"):
        choose_device("tpu")
    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="names one GPU"):
            choose_device("cuda:0", 0, 2)
    else:
        assert choose_device("auto", 1, 2) == torch.device("cpu")
        with pytest.raises(ConfigError, match="no CUDA device"):
            choose_device("cuda", 0, 2)


# -- shares ------------------------------------------------------------------------------------


@pytest.mark.parametrize("total,world", [(10, 3), (2, 4), (0, 2), (7, 1), (131072, 8)])
def test_shares_cover_everything_once(total, world):
    bounds = [S.share_bounds(total, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = S.share_sizes(total, world)
    assert sum(sizes) == total and max(sizes) - min(sizes) <= 1
    latents = [S.latent_slice(total, world, r) for r in range(world)]
    assert [i for s in latents for i in range(total)[s]] == list(range(total))
    assert S.row_share(total, world, world - 1) == slice(*bounds[-1])


def test_local_batch_must_split_evenly():
    assert S.local_batch(4096, 4) == 1024
    with pytest.raises(ConfigError, match="trainer.batch_tokens=10 does not split evenly over 4"):
        S.local_batch(10, 4)


def test_round_robin_contexts_together_are_the_single_stream():
    stream = list(range(23))
    shares = [list(S.rank_items(iter(stream), 3, r)) for r in range(3)]
    assert sorted(x for share in shares for x in share) == stream
    assert shares[1][:3] == [1, 4, 7]
    assert all(S.global_index(j, 3, r) == x for r in range(3) for j, x in enumerate(shares[r]))
    # A resumed rank skips its own first contexts and continues its own share exactly.
    assert list(S.rank_items(iter(stream), 3, 1, skip_local=2)) == shares[1][2:]


def test_dictionary_assignment():
    costs = [S.dictionary_cost(n, 64, 64) for n in (4096, 1024, 1024, 2048)]
    balanced = S.assign_dictionaries(costs, 2)
    assert balanced == S.assign_dictionaries(costs, 2)  # deterministic
    loads = [sum(c for c, o in zip(costs, balanced, strict=True) if o == r) for r in range(2)]
    assert loads[0] == loads[1]  # 4096 | 2048 + 1024 + 1024 (the heaviest alone)
    assert balanced == [0, 1, 1, 1]
    assert S.owned_by(balanced, 0) == [0] and S.owned_by(balanced, 1) == [1, 2, 3]
    # Six: the greedy order is 4096, 2048, then the 1024s to the lighter rank (ties: rank 0).
    six = [S.dictionary_cost(n, 64, 64) for n in (4096, 1024, 1024, 2048, 1024, 1024)]
    assert S.assign_dictionaries(six, 2) == [0, 1, 1, 1, 0, 1]
    assert S.assign_dictionaries(six, 4, "round_robin") == [0, 1, 2, 3, 0, 1]
    assert S.assign_dictionaries(costs[:1], 3) == [0]  # fewer dictionaries than ranks
    with pytest.raises(ConfigError, match="distributed.assign='size'"):
        S.assign_dictionaries(costs, 2, "size")


# -- 2 gloo ranks --------------------------------------------------------------------------


def _collectives_on_rank() -> dict:
    """Every collective once, with rank-dependent numbers; what each rank saw comes back."""
    world = init_world("cpu", timeout_s=30)
    r = world.rank
    out: dict = {"rank": r, "world_size": world.world_size, "backend": world.backend}
    out["tag"] = world.tag()
    out["sum"] = C.all_reduce_(world, torch.arange(5.0) * (r + 1)).tolist()
    out["max"] = C.all_reduce_(world, torch.tensor([r, -r]), "max").tolist()
    out["min"] = C.all_reduce_(world, torch.tensor([r, -r]), "min").tolist()
    out["mean"] = C.all_reduce_mean_(world, torch.tensor([float(r), 10.0 * r])).tolist()
    grads = [torch.full((2, 3), float(r + 1)), torch.full((4,), 10.0 * r), torch.ones(1)]
    C.all_reduce_many_(world, grads)
    out["many"] = [g.tolist() for g in grads]
    # float64 sums keep what float32 would lose: 1e16 + 1 + 2.
    out["metrics"] = C.all_reduce_metrics(world, {"big": 1e16 + r, "rows": 3.0 + r})
    out["metrics_max"] = C.all_reduce_metrics(world, {"a": float(r), "b": -float(r)}, "max")
    try:
        C.all_reduce_metrics(world, {"loss" if r == 0 else "fvu": 1.0})
        out["mismatch"] = None
    except DistributedError as e:
        out["mismatch"] = str(e)
    out["flagged"] = C.flagged_ranks(world, r == 1)
    out["none_flagged"] = C.flagged_ranks(world, False)
    out["object"] = C.broadcast_object(world, {"output_dir": "/runs/a"} if r == 0 else None)
    out["broadcast"] = C.broadcast_(world, torch.full((3,), float(r + 7))).tolist()
    out["objects"] = C.all_gather_objects(world, {"rank": r, "bytes": 100 * (r + 1)})
    rows = torch.full((r + 1, 3), float(r))
    out["gather"] = [t.tolist() for t in C.all_gather_rows(world, rows)]
    empty_here = torch.zeros((0, 2)) if r == 0 else torch.ones((2, 2))
    out["gather_empty"] = [tuple(t.shape) for t in C.all_gather_rows(world, empty_here)]
    try:
        C.all_gather_rows(world, torch.zeros(2, 3 + r))
        out["gather_mismatch"] = None
    except DistributedError as e:
        out["gather_mismatch"] = str(e)
    # rank s sends rank d a [s + d + 1, 2 + d] block of 10·s + d: sizes differ per pair.
    sends = [torch.full((r + d + 1, 2 + d), 10.0 * r + d) for d in range(world.world_size)]
    for name, via_gather in (("a2a", False), ("a2a_gather", True)):
        got = C.all_to_all(world, sends, via_gather=via_gather)
        out[name] = [(tuple(t.shape), t.unique().tolist()) for t in got]
    ints = [torch.arange(3, dtype=torch.int64) + 100 * d + r for d in range(world.world_size)]
    out["a2a_int"] = [t.tolist() for t in C.all_to_all(world, ints)]
    C.barrier(world, "end", timeout_s=20)
    close_world(world)
    import torch.distributed as dist

    out["closed"] = not dist.is_initialized()
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(_collectives_on_rank, 2, timeout_s=60)


def test_two_gloo_ranks_join(two_ranks):
    assert [o["rank"] for o in two_ranks] == [0, 1]
    assert all(o["world_size"] == 2 and o["backend"] == "gloo" for o in two_ranks)
    assert two_ranks[1]["tag"] == "[rank 1/2] "
    assert all(o["closed"] for o in two_ranks)


def test_reductions(two_ranks):
    for o in two_ranks:
        assert o["sum"] == [0.0, 3.0, 6.0, 9.0, 12.0]
        assert o["max"] == [1, 0] and o["min"] == [0, -1]
        assert o["mean"] == [0.5, 5.0]
        assert o["many"] == [[[3.0] * 3] * 2, [10.0] * 4, [2.0]]
        assert o["metrics"] == {"big": 2e16 + 1, "rows": 7.0}
        assert o["metrics_max"] == {"a": 1.0, "b": 0.0}
        assert "different metric names" in o["mismatch"]  # on every rank, not just one
        assert o["flagged"] == [1] and o["none_flagged"] == []


def test_broadcasts_and_gathers(two_ranks):
    for o in two_ranks:
        assert o["object"] == {"output_dir": "/runs/a"}
        assert o["broadcast"] == [7.0, 7.0, 7.0]
        assert o["objects"] == [{"rank": 0, "bytes": 100}, {"rank": 1, "bytes": 200}]
        assert o["gather"] == [[[0.0] * 3], [[1.0] * 3, [1.0] * 3]]
        assert o["gather_empty"] == [(0, 2), (2, 2)]
        assert "only the first dimension may differ" in o["gather_mismatch"]


def test_all_to_all_exchanges_each_pair(two_ranks):
    for o in two_ranks:
        d = o["rank"]
        expected = [((s + d + 1, 2 + d), [10.0 * s + d]) for s in range(2)]
        assert o["a2a"] == expected
        assert o["a2a_gather"] == expected  # the fallback gives the same exchange
        assert o["a2a_int"] == [[100 * d + s + i for i in range(3)] for s in range(2)]


def _barrier_without_rank_1() -> tuple[float, str | None]:
    world = init_world("cpu", timeout_s=30)
    if world.rank == 1:
        time.sleep(6)  # never reaches the barrier
        return 0.0, None
    start = time.monotonic()
    try:
        C.barrier(world, "checkpoint step 10", timeout_s=2)
    except DistributedError as e:
        return time.monotonic() - start, str(e)
    return time.monotonic() - start, None


def test_barrier_names_the_rank_that_never_arrives():
    (elapsed, message), _ = run_ranks(_barrier_without_rank_1, 2, timeout_s=60)
    assert message is not None, "the barrier passed without rank 1"
    assert "barrier 'checkpoint step 10'" in message and "within 2 s" in message
    assert "rank 1 failed to pass" in message  # the missing rank, named in our words
    assert elapsed < 10


def _sleep_on_rank_1() -> int:
    import os

    if os.environ["RANK"] == "1":
        time.sleep(120)
    return 0


def _raise_on_rank_1() -> int:
    import os

    if os.environ["RANK"] == "1":
        raise ValueError("rank 1 broke")
    return 0


def test_harness_kills_a_hung_rank_and_reports_errors():
    start = time.monotonic()
    with pytest.raises(RanksFailed, match=r"rank\(s\) 1 of 2 did not finish within 8 s"):
        run_ranks(_sleep_on_rank_1, 2, timeout_s=8)
    assert time.monotonic() - start < 20
    with pytest.raises(RanksFailed, match=r"(?s)rank 1:\n.*ValueError: rank 1 broke"):
        run_ranks(_raise_on_rank_1, 2, timeout_s=30)


def test_under_torchrun(tmp_path):
    """The real launcher: each worker finds its rank in torchrun's variables."""
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, torch
            from saetrain.distributed import collectives as C, init_world, close_world
            world = init_world("cpu", timeout_s=30)
            total = C.all_reduce_(world, torch.tensor([world.rank + 1.0]))
            print(f"rank {world.rank}/{world.world_size} local {world.local_rank} "
                  f"sum {total.item():g}", flush=True)
            close_world(world)
            """
        )
    )
    done = run_torchrun(
        [str(script)], nproc=2, timeout_s=90, env={"PYTHONPATH": ":".join(sys.path)}
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "rank 0/2 local 0 sum 3" in done.stdout
    assert "rank 1/2 local 1 sum 3" in done.stdout


def test_torchrun_past_its_limit_is_killed_with_its_ranks(tmp_path):
    """torchrun gives each worker its own session: the limit must end them too."""
    import os

    pids = tmp_path / "pids"
    pids.mkdir()
    script = tmp_path / "sleeper.py"
    script.write_text(
        "import os, pathlib, sys, time\n"
        f"pathlib.Path({str(pids)!r}, os.environ['RANK']).write_text(str(os.getpid()))\n"
        "time.sleep(120)\n"
    )
    start = time.monotonic()
    with pytest.raises(RanksFailed, match="ran past 15 s"):
        run_torchrun([str(script)], nproc=2, timeout_s=15)
    assert time.monotonic() - start < 60  # not the ranks' 120 s
    ranks = [int(p.read_text()) for p in pids.iterdir()]
    assert len(ranks) == 2
    for pid in ranks:
        try:
            os.kill(pid, 0)
            alive = not open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z")
        except (ProcessLookupError, FileNotFoundError):
            alive = False
        assert not alive, f"rank process {pid} survived the limit"


def test_the_resume_command_names_torchrun_with_the_world_size():
    from saetrain.__main__ import launcher

    assert launcher({}) == ["python"]
    assert launcher({"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}) == ["python"]
    assert launcher({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}) == [
        "torchrun",
        "--nproc-per-node=2",
    ]
    assert launcher({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}) == [
        "torchrun",
        "--nnodes=2",
        "--nproc-per-node=8",
    ]
