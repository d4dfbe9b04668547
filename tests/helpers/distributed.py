"""Run a function on N CPU ranks (gloo) for a test, and never hang the test run.

`run_ranks` spawns N processes with the variables torchrun would set (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), calls `fn(*args)` in each and returns
the results in rank order. The function makes its own World (saetrain.distributed.init_world),
so the code under test is the code a real run uses. A rank that raises, dies or runs past the
time limit fails the test with its rank and its traceback; everything still running is killed.

`run_torchrun` starts the real launcher (`torchrun --standalone`) in its own process group, for
tests of the CLI under torchrun, and kills the whole group at the time limit.

`fn` must be importable by a fresh interpreter (a module-level function of a test module).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from saetrain.bench.launch import LaunchTimeout, run_launch, torchrun_command
from tests.helpers.cli_process import tiny_overrides


def free_port() -> int:
    """A TCP port free now on localhost (the rendezvous of one spawned world)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What torchrun sets for one worker on one machine."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    args: tuple[Any, ...],
    results: Any,
    env: dict[str, str],
) -> None:
    os.environ.update(rank_env(rank, world_size, port))
    os.environ.update(env)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)  # 2 shared cores: one thread per rank
        # Pickled here, plainly: tensors then travel as bytes, not as shared-memory handles
        # that die with this process.
        results.put((rank, "ok", pickle.dumps(fn(*args))))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()  # the result is out before the process goes
        # Skip interpreter teardown: after a failed collective, a gloo group's destructor (and
        # atexit's destroy_process_group) can block on the dead peer.
        os._exit(0)


class RanksFailed(AssertionError):
    """A spawned rank raised, died or ran past the time limit."""


def run_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    timeout_s: float = 60.0,
    env: dict[str, str] | None = None,
    lost: Sequence[int] = (),
) -> list[Any]:
    """`fn(*args)` on `world_size` spawned ranks; their return values in rank order.

    `lost`: ranks that the test kills (or hangs) on purpose: the others' results are awaited
    alone, and a lost rank's result is None (or what it returned, if it did).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, rank, world_size, port, tuple(args), results, dict(env or {})),
            name=f"rank-{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    done: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    awaited = [r for r in range(world_size) if r not in lost]
    try:
        while any(r not in done for r in awaited):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, status, value = results.get(timeout=min(left, 0.5))
            except queue.Empty:
                # A rank that died without a word (killed, segfault) will never answer.
                dead = [r for r in awaited if r not in done and procs[r].exitcode is not None]
                if dead:
                    time.sleep(0.2)  # its result may still be in the pipe
                    while not results.empty():
                        rank, status, value = results.get()
                        done[rank] = (status, value)
                    dead = [r for r in dead if r not in done]
                    if dead:
                        codes = ", ".join(f"rank {r}: exit code {procs[r].exitcode}" for r in dead)
                        raise RanksFailed(f"{codes} without a result") from None
                continue
            done[rank] = (status, value)
        missing = [r for r in awaited if r not in done]
        if missing:
            raise RanksFailed(
                f"rank(s) {', '.join(map(str, missing))} of {world_size} did not finish within "
                f"{timeout_s:g} s (killed); finished: {sorted(done) or 'none'}"
            )
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(5)
        results.close()
    errors = [
        f"rank {r}:\n{v}" for r, (s, v) in sorted(done.items()) if s == "error" and r not in lost
    ]
    if errors:
        raise RanksFailed("\n".join(errors))
    return [pickle.loads(done[r][1]) if r in done else None for r in range(world_size)]


def run_torchrun(
    args: Sequence[str],
    nproc: int = 2,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc-per-node=nproc ARGS`, killed (all of it) at the limit.

    Returns the finished process (check its returncode); raises RanksFailed with the output's
    tail when it runs too long.
    """
    command = [*torchrun_command(nproc), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    try:
        returncode, out = run_launch(command, full_env, cwd, timeout_s)
    except LaunchTimeout as e:
        raise RanksFailed(
            f"torchrun {' '.join(args)} ran past {timeout_s:g} s (killed); output:\n"
            f"{e.output[-4000:]}"
        ) from None
    return subprocess.CompletedProcess(command, returncode, out, None)


def _overrides(tiny_model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    """`tiny_overrides` plus checkpoints and a rank timeout, then `extra`."""
    return [
        *tiny_overrides(tiny_model, corpus, out),
        "checkpoint.every_tokens=512",
        "checkpoint.keep_last=10",
        "distributed.timeout_s=60",
        *extra,
    ]


def _torchrun(args: list[str], cwd):
    env = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return run_torchrun(["-m", "saetrain", *args], nproc=2, timeout_s=240, env=env, cwd=cwd)
