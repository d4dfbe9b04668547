"""Checkpoints: the whole training state on disk, written atomically, so a killed run resumes.

A checkpoint holds every dictionary's weights, optimiser and schedule position, dead-latent
counters and normalisation scales, the buffer's contents and shuffle state, the data position (and
the disk cache's), the RNG states and the resolved config. It is written to a temporary file,
fsynced and renamed, so a crash or a full disk while saving leaves the previous checkpoint as it
was. Resuming refuses a config that disagrees with the checkpoint on anything that shapes the
training, and lists the differences.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from saetrain.atomic import _fsync_dir
from saetrain.distributed.collectives import barrier
from saetrain.distributed.world import World
from saetrain.errors import ConfigError
from saetrain.errors import TrainingDiverged as TrainingDiverged  # re-exported (the old home)
from saetrain.errors import TrainingInterrupted as TrainingInterrupted  # re-exported

log = logging.getLogger(__name__)

FOLDER = "checkpoints"
_NAME = re.compile(r"^step-(\d+)\.pt$")
# Config fields a resumed run may change: where and how it reports, evaluates and saves.
MAY_DIFFER = (
    "resume",
    "output_dir",
    "logger.",
    "eval.",
    "publish.",
    "checkpoint.",
    "model.device",
    "buffer.prefetch_batches",
    "cache.verify",
    "cache.shard_tokens",
    # The timeout, and how dictionaries are assigned to ranks (a resume that assigns them
    # otherwise finds a state missing and says so: run/train_loop.py).
    "distributed.",
)
# Not in MAY_DIFFER: cache.dir. The stream position counts cached chunks and contexts of that
# cache; resumed against another (or none) it would repeat and skip tokens.


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / FOLDER


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def _write_atomically(path: Path, state: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


# What each rank of a torchrun run holds for itself: its share of the stream, its buffer, its
# RNG, and the trainers it writes (None for the others': a dictionary's state is written by the
# rank that owns it, or by rank 0 when every rank trains it, or by every rank, each its own
# latents, when the dictionary is split over ranks: distributed.shard_latents). The rest
# (config, step) is the same on every rank and written once, by rank 0.
RANK_KEYS = ("buffer", "stream", "rng", "trainers")


def rank_part(path: Path, rank: int) -> Path:
    """Rank `rank`'s part of checkpoint `path` (rank 0's is inside `path` itself)."""
    return path.with_name(f"{path.stem}.rank-{rank}.pt")


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    state: dict[str, Any],
    keep_last: int,
    world: World | None = None,
) -> Path:
    """Write `state` as checkpoint `step` atomically, then delete all but the newest `keep_last`.

    Under torchrun every rank calls this with its own `state`: ranks 1.. write their RANK_KEYS
    to a part file each, and rank 0 writes step-N.pt (the shared state and its own part) only
    once every part is on disk, so a rank that dies while saving leaves no checkpoint that looks
    complete. Each rank deletes only its own files.
    """
    world = world or World()
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:09d}.pt"
    if world.rank > 0:
        _write_atomically(rank_part(path, world.rank), {k: state[k] for k in RANK_KEYS})
    barrier(world, f"checkpoint step {step}: every rank's part written")
    if world.is_main:
        _write_atomically(
            path, {**state, "world_size": world.world_size} if world.distributed else state
        )
        for old in list_checkpoints(run_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
        log.info("checkpoint written: %s", path)
    barrier(world, f"checkpoint step {step}: written")
    if world.rank > 0:  # this rank's parts of the checkpoints rank 0 deleted
        for part in folder.glob(f"step-*.rank-{world.rank}.pt"):
            if not part.with_name(part.name.replace(f".rank-{world.rank}", "")).exists():
                part.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, world: World | None = None) -> dict[str, Any]:
    """Checkpoint `path` as this rank saved it (its own part merged in under torchrun).

    A checkpoint is resumed by as many ranks as wrote it: the stream's shares and the buffers
    are per rank.
    """
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    world = world or World()
    saved = int(state.pop("world_size", 1))
    if saved != world.world_size:
        how = "python -m saetrain" if saved == 1 else f"torchrun --nproc-per-node={saved}"
        raise ConfigError(
            f"resume: checkpoint {path} was written by {saved} rank(s), and this run has "
            f"{world.world_size}: each rank's share of the stream and its buffer are in the "
            f"checkpoint, so resume with {saved} ({how} ... resume=...)"
        )
    if world.rank > 0:
        part = torch.load(rank_part(path, world.rank), map_location="cpu", weights_only=True)
        shared = state["trainers"]
        state.update(part)
        # This rank's own state first: a latent shard's is in every rank's part (rank 0's too).
        state["trainers"] = [
            b if b is not None else a for a, b in zip(shared, part["trainers"], strict=True)
        ]
    return state


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out |= _flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: obj}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`field: checkpoint value → current value` for every field that shapes the training."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == m or key.startswith(m) for m in MAY_DIFFER):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {a.get(key, '<absent>')!r} → {b.get(key, '<absent>')!r}")
    return diffs


def check_resumable(saved_config: dict[str, Any], current_config: dict[str, Any], path: Path):
    diffs = config_differences(saved_config, current_config)
    if diffs:
        listed = "\n  ".join(diffs)
        raise ConfigError(
            f"resume: the config disagrees with checkpoint {path} on:\n  {listed}\n"
            "resume with the run's own config, or start a new run"
        )


NO_RESUME = ("", "false", "no", "none", "null", "0")


def wants_resume(resume: str | None) -> bool:
    """`resume` asks for a resume (Hydra turns resume=false into the string 'False')."""
    return resume is not None and resume.strip().lower() not in NO_RESUME


def find_resume_dir(resume: str, output_dir: Path | None, outputs_root: Path | None) -> Path:
    """The run folder `resume` points at: a path, or (true/latest) output_dir or the newest run
    under Hydra's outputs/ that holds a checkpoint."""
    if resume.lower() not in ("true", "latest"):
        folder = Path(resume).expanduser()
        if not list_checkpoints(folder):
            raise ConfigError(f"resume={resume!r}: no checkpoint in {folder / FOLDER}")
        return folder
    if output_dir is not None and list_checkpoints(output_dir):
        return output_dir
    candidates: list[tuple[float, Path]] = []
    if outputs_root is not None and outputs_root.is_dir():
        for ckpt_dir in outputs_root.glob(f"**/{FOLDER}"):
            last = list_checkpoints(ckpt_dir.parent)
            if last:
                candidates.append((last[-1].stat().st_mtime, ckpt_dir.parent))
    if not candidates:
        where = output_dir if output_dir is not None else outputs_root
        raise ConfigError(
            f"resume={resume!r}: found no run with a checkpoint under {where}; pass the run's "
            "folder (resume=/path/to/run)"
        )
    return max(candidates)[1]


class StopRequest:
    """SIGTERM/SIGINT during the training loop set a flag that the loop reads after each step (it
    then writes a checkpoint and stops); a second SIGINT stops at once. The run's one signal
    handler (`RunGuard`, saetrain/training/run_folder.py) passes signals here while the loop
    runs."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def is_set(self) -> bool:
        return self._event.is_set()

    def request(self, signum: int) -> None:
        """A signal arrived: stop after this step (raise KeyboardInterrupt on a second SIGINT)."""
        if self._event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning(
            "%s received: writing a checkpoint after this step, then stopping",
            signal.Signals(signum).name,
        )
        self._event.set()


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
