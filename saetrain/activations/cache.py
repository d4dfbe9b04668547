"""An on-disk cache of activations, so a sweep never runs the LM twice on the same tokens.

A cache folder is named by a hash of everything that determines the activations (model, revision,
dtype, dataset and its files, packing, seed, sites, storage dtype): any later run with the same
key reads it instead of running the LM. It holds safetensors shards (one tensor per site) and a
manifest with each shard's token and context counts and sha256. One process writes a key at a time
(an flock, released by the kernel when its holder dies). Writes are atomic per shard: a
shard appears in the manifest only after its file is complete and renamed into place, so a run
killed while writing leaves nothing a reader trusts, and the next run continues the stream from
the contexts the manifest records. A shard whose bytes do not match its checksum is reported,
never read.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from saetrain.activations.tokens import LOCAL_BUILDERS, expand_data_files
from saetrain.atomic import atomic_write_bytes, atomic_write_json
from saetrain.config import Config, second_model
from saetrain.errors import CacheError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
LOCK = "writer.lock"


def _file_fingerprint(path: str) -> list[Any]:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


def activation_key_fields(
    cfg: Config, sites: list[str], rank: int = 0, world_size: int = 1
) -> dict[str, Any]:
    """Everything that determines the training stream's activations, as plain JSON values.

    Under torchrun each rank's stream is its share of the contexts (every world_size-th), so each
    rank caches and reads its own share under its own key (one writer per key, as ever); a
    single process's key is unchanged. A cache is thus reused by runs with the same world size.
    """
    data = dataclasses.asdict(cfg.data)
    if cfg.data.path in LOCAL_BUILDERS:
        data["data_files"] = [
            _file_fingerprint(f) for f in expand_data_files(list(cfg.data.data_files))
        ]
    model = dataclasses.asdict(cfg.model)
    model.pop("device")  # the same weights give the same activations to rounding on any device
    extra = {}
    if second_model(cfg) is not None:  # model diffing: the second model's sites are in the rows too
        extra["model_b"] = {
            k: v for k, v in dataclasses.asdict(cfg.model_b).items() if k != "device"
        }
    fields = {
        "format": CACHE_FORMAT,
        "model": model,
        **extra,
        "data": data,
        "seed": cfg.seed,
        "sites": list(sites),
        "dtype": cfg.buffer.dtype,
    }
    if world_size > 1:
        fields["share"] = {"rank": rank, "world_size": world_size}
    return fields


def cache_key(fields: dict[str, Any]) -> str:
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ActivationCache:
    """One key's folder: the manifest, the shards, and a writer lock."""

    def __init__(
        self,
        root: str | Path,
        fields: dict[str, Any],
        widths: dict[str, int],
        dtype: torch.dtype,
        shard_tokens: int,
        verify: bool = True,
    ):
        self.key = cache_key(fields)
        self.folder = Path(root).expanduser() / self.key
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fields = fields
        self.sites = list(fields["sites"])
        self.widths = widths
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.verify = verify
        self.manifest = self._load_manifest()
        self._pending: list[torch.Tensor] = []
        self._pending_tokens = 0
        self._pending_contexts = 0
        self._lock_held = False
        self._lock_fd: int | None = None

    # -- reading --------------------------------------------------------------------------------

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    @property
    def contexts(self) -> int:
        """Training contexts the shards cover, from the start of the stream."""
        return sum(s["contexts"] for s in self.shards)

    def _load_manifest(self) -> dict[str, Any]:
        path = self.folder / MANIFEST
        if not path.exists():
            return {"format": CACHE_FORMAT, "key": self.key, "fields": self.fields, "shards": []}
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"activation cache manifest {path} is unreadable ({e})") from None
        stored = json.loads(json.dumps(manifest.get("fields"), sort_keys=True, default=str))
        wanted = json.loads(json.dumps(self.fields, sort_keys=True, default=str))
        if stored != wanted:
            raise CacheError(
                f"activation cache {self.folder} was written for other settings than this run's "
                "(its manifest's fields differ from the key's); remove the folder"
            )
        return manifest

    def _drop_strays(self) -> None:
        """Remove files a killed writer left that the manifest does not list."""
        listed = {s["file"] for s in self.shards} | {MANIFEST, LOCK}
        for path in self.folder.iterdir():
            if path.name not in listed:
                log.warning("activation cache: removing %s, not in the manifest", path)
                path.unlink(missing_ok=True)

    def read_shard(self, entry: dict[str, Any]) -> torch.Tensor:
        """One shard's rows, the sites side by side; checksum verified first."""
        path = self.folder / entry["file"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CacheError(
                f"activation cache shard {path} is listed in the manifest but missing; remove "
                f"{self.folder} to rebuild the cache"
            ) from None
        if self.verify and _sha256(data) != entry["sha256"]:
            raise CacheError(
                f"activation cache shard {path} is corrupted (its sha256 differs from the "
                f"manifest's); remove {self.folder} to rebuild the cache"
            )
        tensors = safetensors_load(data)
        return torch.cat([tensors[site] for site in self.sites], dim=-1)

    def contexts_of(self, n_shards: int) -> int:
        """Training contexts the first `n_shards` shards (in writing order) cover."""
        return sum(s["contexts"] for s in self.shards[:n_shards])

    @property
    def covered_contexts(self) -> int:
        """Contexts written or pending: the stream position from which new rows are cache-worthy."""
        return self.contexts + self._pending_contexts

    def read(
        self,
        generator: torch.Generator,
        n_shards: int | None = None,
        skip_chunks: int = 0,
        chunk: int = 4096,
    ) -> Iterator[torch.Tensor]:
        """The first `n_shards` shards once each, in a seeded random order, in chunks of `chunk`
        rows; the first `skip_chunks` chunks are skipped (a resumed run has used them)."""
        n = len(self.shards) if n_shards is None else n_shards
        order = torch.randperm(n, generator=generator).tolist()
        index = 0
        for i in order:
            n_chunks = -(-self.shards[i]["tokens"] // chunk)
            if index + n_chunks <= skip_chunks:
                index += n_chunks
                continue
            rows = self.read_shard(self.shards[i]).to(self.dtype)
            for part in rows.split(chunk):
                if index >= skip_chunks:
                    yield part
                index += 1

    # -- writing --------------------------------------------------------------------------------

    def acquire(self) -> bool:
        """Become this key's only writer; False while another process (or cache object) is.

        An advisory lock (flock) on writer.lock: the kernel releases it when its holder exits,
        killed or not, so there is no stale lock to take over. The writer then re-reads the
        manifest (another writer may have added shards since this cache was opened) and removes
        files it does not list (a killed writer's temporary or unlisted shard) — only the lock
        holder may, since a reader could otherwise delete a live writer's files.
        """
        if self._lock_held:
            return True
        fd = os.open(self.folder / LOCK, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._lock_fd = fd
        self._lock_held = True
        self.manifest = self._load_manifest()
        self._drop_strays()
        return True

    def add(self, rows: torch.Tensor, contexts: int) -> None:
        """Rows of `contexts` consecutive training contexts; a shard is written when full."""
        self._pending.append(rows.detach().to("cpu", self.dtype))
        self._pending_tokens += rows.shape[0]
        self._pending_contexts += contexts
        if self._pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        """Write what is pending as one shard, then the manifest that lists it."""
        if not self._pending_tokens:
            return
        rows = torch.cat(self._pending)
        tensors: dict[str, torch.Tensor] = {}
        start = 0
        for site in self.sites:
            width = self.widths[site]
            tensors[site] = rows[:, start : start + width].contiguous()
            start += width
        data = safetensors_bytes(tensors)
        name = f"shard-{len(self.shards):06d}.safetensors"
        atomic_write_bytes(self.folder / name, data)
        self.shards.append(
            {
                "file": name,
                "tokens": int(rows.shape[0]),
                "contexts": self._pending_contexts,
                "sha256": _sha256(data),
            }
        )
        atomic_write_json(self.folder / MANIFEST, self.manifest)
        self._pending, self._pending_tokens, self._pending_contexts = [], 0, 0

    def release(self) -> None:
        """Write the last partial shard and give up the lock."""
        if not self._lock_held:
            return
        try:
            self.flush()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None
            self._lock_held = False
