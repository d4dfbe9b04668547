"""A run folder's lock, and the marker that says the run in it finished.

Two processes writing one run folder (a second started while the first still ran, or two Hydra
runs started in the same second) interleave checkpoints and metrics rows. A process holds an
flock on `run.lock` while it writes the folder; the kernel releases it when the holder dies, so
a killed run never leaves a stale lock. The file holds the holder's pid, which a refused process
names.

A run that finished writes `finished.json` after its last dictionary is saved. Resuming a
finished run would train again from the last checkpoint and overwrite the results, so resume
answers "already finished" and touches nothing.

`RunGuard` holds both for one run() and is its one SIGTERM / SIGINT handler, from its start: in
the training loop it passes the signal to the loop's `StopRequest` (which writes a checkpoint,
then stops); elsewhere the signal stops the run at once with a `RunStopped` that says which phase
it interrupted and what the folder holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from saetrain.atomic import atomic_write_json
from saetrain.errors import ConfigError, RunFolderLocked, RunStopped
from saetrain.progress import current_phase
from saetrain.training.checkpoint import StopRequest, list_checkpoints

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
FINISHED_FILE = "finished.json"


class RunLock:
    """An exclusive flock on `<folder>/run.lock`, holding this process's pid."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise RunFolderLocked naming the holder's pid."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderLocked(
                f"run folder {self.folder} is in use by another process ({holder}); wait for it "
                f"to finish or stop it, or choose another output_dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the file (no pid left behind) and unlock. The file stays: removing it would let
        a process that opened it before the removal lock a file nobody else sees."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    return text or "pid unknown"


def mark_finished(folder: str | Path, dictionaries: list[str], tokens: int) -> Path:
    """Record that the run in `folder` trained, evaluated and saved every dictionary."""
    path = Path(folder) / FINISHED_FILE
    atomic_write_json(
        path,
        {
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "dictionaries": dictionaries,
            "tokens_seen": tokens,
        },
    )
    return path


def finished(folder: str | Path) -> dict[str, Any] | None:
    """The finished marker's contents when the run in `folder` finished, else None."""
    path = Path(folder) / FINISHED_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def replace_finished_run(folder: str | Path) -> None:
    """Make way for a new run in `folder`. A finished run there is replaced: its marker and its
    checkpoints go (left, they would be taken for the new run's: resume continues the newest, and
    keep_last would delete the new ones first). An unfinished run's checkpoints are refused: the
    user most likely meant to resume it."""
    folder = Path(folder)
    checkpoints = list_checkpoints(folder)
    if checkpoints and finished(folder) is None:
        raise ConfigError(
            f"output_dir {folder} holds the checkpoints of a run that did not finish (newest: "
            f"{checkpoints[-1].name}); continue it with resume={folder}, or choose another "
            "output_dir"
        )
    for path in checkpoints:
        path.unlink()
    if checkpoints:
        log.info(
            "replacing the finished run in %s (its %d checkpoints removed)",
            folder,
            len(checkpoints),
        )
    (folder / FINISHED_FILE).unlink(missing_ok=True)


RUN_INFO = "saetrain_run.json"
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def written_since(folder: Path, since: float, resuming: bool) -> tuple[str, bool]:
    """What `folder` holds of this run's work since `since` (time.time()): a sentence, and
    whether a checkpoint is there to resume from."""
    checkpoints = list_checkpoints(folder)
    saved = sorted(
        d.name
        for d in (folder.iterdir() if folder.is_dir() else [])
        if (d / RUN_INFO).is_file() and (d / RUN_INFO).stat().st_mtime >= since
    )
    new = [c for c in checkpoints if c.stat().st_mtime >= since]
    parts = []
    if new:
        parts.append(f"the newest checkpoint is {new[-1]}")
    elif checkpoints and resuming:
        parts.append(f"no checkpoint was written; {checkpoints[-1]}, resumed from, is unchanged")
    elif checkpoints:
        parts.append(f"no checkpoint was written (the newest is {checkpoints[-1]})")
    if saved:
        parts.append(f"saved: {', '.join(saved)}")
    if not parts:
        return f"no checkpoint and no dictionary was written to {folder}", False
    return "; ".join(parts), bool(checkpoints)


class RunGuard:
    """One run()'s hold on its folder: the lock, and the signal handlers from its first line."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.resuming = False
        self._lock: RunLock | None = None
        self._started = time.time()
        self._previous: dict[int, Any] = {}
        self._deferred: StopRequest | None = None

    def hold(self, folder: str | Path, resuming: bool) -> None:
        """Lock `folder` (the run's, once a resume has found it) before anything is written to
        it. A new run there replaces what finished there before."""
        self.folder = Path(folder)
        self.resuming = resuming
        if self._lock is None:
            self._lock = RunLock(self.folder).acquire()
        if not resuming:
            replace_finished_run(self.folder)

    @contextlib.contextmanager
    def deferring_to(self, stop: StopRequest) -> Iterator[None]:
        """Within: a signal goes to `stop` (the training loop checkpoints, then stops) instead of
        stopping the run at once."""
        self._deferred = stop
        try:
            yield
        finally:
            self._deferred = None

    def _handle(self, signum: int, frame: object) -> None:
        if self._deferred is not None:
            self._deferred.request(signum)
            return
        written, resumable = written_since(self.folder, self._started, self.resuming)
        raise RunStopped(signum, current_phase() or "start-up", self.folder, written, resumable)

    def __enter__(self) -> RunGuard:
        if threading.current_thread() is threading.main_thread():  # signals reach it only
            self._previous = {sig: signal.signal(sig, self._handle) for sig in _SIGNALS}
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def finished_resume_target(resume: str, output_dir: Path | None) -> Path | None:
    """The finished run that `resume` names directly (a folder; output_dir for true/latest), if
    it finished: checked before looking for a checkpoint, which a finished run may lack."""
    if resume.strip().lower() in ("true", "latest"):
        folder = output_dir
    else:
        folder = Path(resume).expanduser()
    return folder if folder is not None and finished(folder) is not None else None
