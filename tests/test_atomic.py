"""A full disk at any point of an atomic write keeps the old file and leaves no temporary."""

from __future__ import annotations

import errno
import io
import json
import os
import stat

import pytest
import torch

from saetrain import atomic
from saetrain.atomic import atomic_write_bytes, atomic_write_json
from saetrain.dictionaries import TopKSAE
from saetrain.export.saelens import load_dictionary, save_dictionary

OLD = b"the good old contents\n" * 100
NEW = b"N" * 300_000  # larger than the write buffer: reaches the disk in pieces


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _DiskFillsUp(io.RawIOBase):
    """A raw file that accepts `room` bytes, then fails every write with ENOSPC."""

    def __init__(self, fd: int, room: int):
        self.fd, self.room = fd, room
        self.received = 0

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def write(self, b) -> int:
        if self.room <= 0:
            raise _enospc()
        n = min(len(b), self.room)
        os.write(self.fd, bytes(b[:n]))
        self.room -= n
        self.received += n
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


def _state(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write_bytes(path, OLD)
    return path


def test_disk_full_mid_write(target, monkeypatch):
    raws: list[_DiskFillsUp] = []

    def fdopen(fd: int, mode: str = "r", *args, **kwargs):
        assert mode == "wb"
        raws.append(_DiskFillsUp(fd, room=100_000))
        return io.BufferedWriter(raws[-1])

    monkeypatch.setattr(atomic.os, "fdopen", fdopen)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(target, NEW)
    assert e.value.errno == errno.ENOSPC
    assert raws[0].received == 100_000  # it really was cut off mid-write
    assert _state(target.parent) == {"file.bin": OLD}  # old bytes, no temporary


def test_disk_full_at_fsync(target, monkeypatch):
    calls: list[int] = []

    def fsync(fd: int) -> None:
        calls.append(fd)
        raise _enospc()

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, NEW)
    assert len(calls) == 1
    assert _state(target.parent) == {"file.bin": OLD}


def test_file_and_folder_are_fsynced(target, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        synced.append(kind)
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    atomic_write_bytes(target, NEW)
    assert synced == ["file", "dir"]  # the data before the rename, the rename after
    assert target.read_bytes() == NEW


def test_a_new_file_gets_umask_permissions_and_an_old_file_keeps_its_mode(tmp_path):
    fresh = tmp_path / "fresh.json"
    atomic_write_json(fresh, {"a": 1})
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~atomic._umask()
    os.chmod(fresh, 0o640)
    atomic_write_json(fresh, {"a": 2})
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640
    assert json.loads(fresh.read_text()) == {"a": 2}


def test_saved_dictionary_survives_a_full_disk_on_resave(tmp_path, monkeypatch):
    """A second save that runs out of space leaves the first save loadable and byte-identical."""
    sae = TopKSAE(8, 32, k=3, generator=torch.Generator().manual_seed(0))
    save_dictionary(sae, tmp_path, {"model_name": "m", "hook_name": "h"}, {"tokens_seen": 1})
    before = _state(tmp_path)
    with torch.no_grad():
        sae.W_enc.mul_(2)

    def fsync(fd: int) -> None:
        raise _enospc()

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(OSError):
        save_dictionary(sae, tmp_path, {"model_name": "m", "hook_name": "h"}, {"tokens_seen": 2})
    monkeypatch.undo()
    assert _state(tmp_path) == before
    assert torch.equal(
        load_dictionary(tmp_path).W_enc,
        TopKSAE(8, 32, k=3, generator=torch.Generator().manual_seed(0)).W_enc,
    )
