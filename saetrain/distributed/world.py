"""Who this process is among the run's ranks, its device, and the process group's life.

torchrun (or any launcher that sets RANK and WORLD_SIZE) starts N processes; each calls
`init_world` once. At world size 1 — a plain `python -m saetrain`, or torchrun with one process —
no process group is made and torch.distributed is never called: the single-process run is the
same code with every collective a no-op (collectives.py). Only this module creates and destroys
the process group; only collectives.py communicates over it.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import inspect
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from saetrain.errors import ConfigError

# What torchrun sets for every worker (torch.distributed.elastic's local agent).
RANK_VARS = ("RANK", "WORLD_SIZE")
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class World:
    """This process's place in the run. At world size 1 it is the whole run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: no process group (world size 1)
    timeout_s: float = DEFAULT_TIMEOUT_S
    # A gloo group beside an NCCL one: monitored_barrier (which names the missing rank) is
    # gloo-only. None when the main group is gloo itself, or at world size 1.
    control_group: Any = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, prints, exports and writes a checkpoint's shared part."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def tag(self) -> str:
        """A prefix for messages that one rank writes: empty at world size 1."""
        return f"[rank {self.rank}/{self.world_size}] " if self.distributed else ""


def resolve_device(device: str) -> torch.device:
    """The device `model.device` names for one process: `auto` means the first GPU when there is
    one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device={device!r} but no CUDA device is available; use cpu")
    return torch.device(device)


def launched_ranks(env: Mapping[str, str] | None = None) -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from a launcher's variables; (0, 1, 0, 1)
    when none are set. Half a set, or numbers that do not fit together, is an error."""
    env = os.environ if env is None else env
    present = [v for v in RANK_VARS if v in env]
    if not present:
        return 0, 1, 0, 1
    if len(present) != len(RANK_VARS):
        missing = [v for v in RANK_VARS if v not in env]
        raise ConfigError(
            f"distributed: {', '.join(present)} set but {', '.join(missing)} not; start the run "
            "with torchrun (which sets both), or unset them for one process"
        )
    try:
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_world_size = int(env.get("LOCAL_WORLD_SIZE", world_size))
    except ValueError as e:
        raise ConfigError(f"distributed: a rank variable is not an integer: {e}") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"distributed: RANK={rank} does not fit WORLD_SIZE={world_size}")
    if not 0 <= local_rank < local_world_size:
        raise ConfigError(
            f"distributed: LOCAL_RANK={local_rank} does not fit LOCAL_WORLD_SIZE={local_world_size}"
        )
    return rank, world_size, local_rank, local_world_size


def choose_device(request: str, local_rank: int = 0, local_world_size: int = 1) -> torch.device:
    """The device of this rank for `model.device` (auto, cpu, cuda, cuda:N).

    One process per machine keeps today's meaning (auto: "cuda" when there is a GPU). Several
    share the machine's GPUs by local rank, one each; an explicit cuda:N cannot be shared.
    """
    if local_world_size == 1:  # one process on this machine: resolve_device's meaning
        try:
            return resolve_device(request)
        except RuntimeError:  # torch.device refused the name
            raise ConfigError(
                f"model.device={request!r}; choose one of: auto, cpu, cuda, cuda:N"
            ) from None
    if request == "cpu":
        return torch.device("cpu")
    cuda = torch.cuda.is_available()
    if request == "auto" and not cuda:
        return torch.device("cpu")
    if request not in ("auto", "cuda") and not request.startswith("cuda:"):
        raise ConfigError(f"model.device={request!r}; choose one of: auto, cpu, cuda, cuda:N")
    if not cuda:
        raise ConfigError(f"model.device={request!r} but no CUDA device is available; use cpu")
    if request.startswith("cuda:"):
        raise ConfigError(
            f"model.device={request!r} names one GPU, but {local_world_size} ranks run on this "
            "machine; use model.device=cuda (each rank takes the GPU of its LOCAL_RANK)"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"distributed: {local_world_size} ranks on this machine but it has {count} GPU(s); "
            f"start at most {count} (torchrun --nproc-per-node={count}), or use model.device=cpu"
        )
    return torch.device("cuda", local_rank)


def init_world(
    device: str = "auto",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
    backend: str | None = None,
) -> World:
    """This process's World; joins the process group when the launcher started several ranks.

    The backend is NCCL for GPUs and gloo for CPUs unless `backend` says otherwise. A rank that
    does not join within `timeout_s` fails every rank's start with a message naming the
    rendezvous address. Every collective after that times out after `timeout_s` too.
    """
    rank, world_size, local_rank, local_world_size = launched_ranks(env)
    dev = choose_device(device, local_rank, local_world_size)
    if world_size == 1:
        return World(device=dev, timeout_s=timeout_s)  # no torch.distributed call at all

    if dist.is_initialized():
        raise RuntimeError("init_world: the process group is already initialised")
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs: dict[str, Any] = {"backend": backend, "rank": rank, "world_size": world_size}
    kwargs["timeout"] = timeout
    if backend == "nccl" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        kwargs["device_id"] = dev  # binds the communicator to this rank's GPU at once
    environ = os.environ if env is None else env
    where = f"{environ.get('MASTER_ADDR', '?')}:{environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(**kwargs)
        control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    except RuntimeError as e:
        raise RuntimeError(
            f"rank {rank} of {world_size}: joining the process group at {where} ({backend}) "
            f"failed or timed out after {timeout_s:g} s (distributed.timeout_s): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    world = World(rank, world_size, local_rank, local_world_size, dev, backend, timeout_s, control)
    atexit.register(close_world, world)  # a no-op once closed
    return world


_broken = False  # a collective failed: the group cannot be destroyed cleanly


def mark_broken() -> None:
    """After a failed collective (collectives.py): leave the group to the process's exit, since
    destroying a gloo group whose peer died can block on that peer."""
    global _broken
    _broken = True


def close_world(world: World) -> None:
    """Leave the process group (idempotent; nothing at world size 1)."""
    if not world.distributed or _broken:
        return
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def world_session(
    device: str = "auto",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
    backend: str | None = None,
) -> Iterator[World]:
    """init_world for a `with` block; the group is destroyed when the block ends, however."""
    world = init_world(device, timeout_s, env, backend)
    try:
        yield world
    finally:
        close_world(world)
