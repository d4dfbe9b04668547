"""A shuffling buffer of activations on the training device.

Consecutive tokens of one context are strongly correlated; training on them in order hurts. The
buffer holds `size` activations, serves them in random order and, once half have been drawn,
overwrites exactly the drawn rows with fresh ones and reshuffles. Every activation the source
makes is drawn exactly once, and memory stays at `size × d` whatever the run's length.

A run that draws fewer rows than the buffer holds gets a buffer of exactly those rows
(`holds_all`): filled once, shuffled once, drawn to its end, never refilled — so a short look
before a long run does not pay the LM for a whole buffer it never trains on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from saetrain.progress import Progress


class ActivationBuffer:
    def __init__(
        self,
        chunks: Iterator[torch.Tensor],
        size: int,
        d: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator,
        state: dict[str, Any] | None = None,
        holds_all: bool = False,
    ):
        self._chunks = chunks
        self._leftover: torch.Tensor | None = None
        self.size = size
        # Every row the run draws is in the first fill: draws go on past half, nothing is refilled.
        self.holds_all = holds_all
        self.generator = generator
        self.storage = torch.empty(size, d, dtype=dtype, device=device)
        self.tokens_served = 0
        self.refills = 0
        if state is not None:
            self._load_state(state)
            return
        # The first fill runs the LM on a whole buffer's worth of tokens: minutes on a big model,
        # so it reports its progress (refills, half a buffer between steps, do not).
        with Progress("buffer fill", size, "rows") as progress:
            self._fill(torch.arange(size, device=device), progress)
        self._reshuffle()

    def state_dict(self) -> dict[str, Any]:
        """Contents and shuffle position: with the source's position, enough to continue exactly."""
        return {
            "storage": self.storage.cpu(),
            "order": self._order.cpu(),
            "pos": self._pos,
            "leftover": self._leftover.cpu() if self._leftover is not None else None,
            "generator": self.generator.get_state(),
            "tokens_served": self.tokens_served,
            "refills": self.refills,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        if tuple(state["storage"].shape) != tuple(self.storage.shape):
            raise ValueError(
                f"buffer state of shape {tuple(state['storage'].shape)} does not fit a buffer of "
                f"{tuple(self.storage.shape)}"
            )
        device = self.storage.device
        self.storage.copy_(state["storage"].to(device))
        self._order = state["order"].to(device)
        self._pos = int(state["pos"])
        leftover = state["leftover"]
        self._leftover = leftover.to(device) if leftover is not None else None
        self.generator.set_state(state["generator"])
        self.tokens_served = int(state["tokens_served"])
        self.refills = int(state["refills"])

    @staticmethod
    def holds_all_size(size: int, batch: int, steps: int) -> int | None:
        """The rows a run draws (`steps × batch`) when fewer than `size`: the buffer it needs
        then holds just those (`holds_all`); None when the run draws a buffer or more."""
        rows = batch * steps
        return rows if rows < size else None

    @staticmethod
    def rows_needed(size: int, batch: int, steps: int, holds_all: bool = False) -> int:
        """How many rows the source must supply for `steps` draws of `batch` (no more is read,
        so a stream can stop the LM — and the cache — exactly there)."""
        if holds_all:  # its one fill
            return size
        total, pos = size, 0
        for _ in range(steps):
            if pos + batch > size // 2:
                total += pos
                pos = 0
            pos += batch
        return total

    def storage_bytes(self) -> int:
        """Bytes of the buffer's storage: the bound the config sets (buffer.size_tokens × width)."""
        return self.storage.numel() * self.storage.element_size()

    def resident_bytes(self) -> int:
        """Bytes of every activation the buffer holds or has had computed for it: the storage,
        the leftover of the last chunk, and what a prefetching source computed ahead."""
        held = [self._leftover] if self._leftover is not None else []
        queued = getattr(self._chunks, "queued", None)
        if queued is not None:
            held += queued()
        return self.storage_bytes() + sum(t.numel() * t.element_size() for t in held)

    def _take(self, n: int, progress: Progress | None = None) -> torch.Tensor:
        """The next n activations from the source, carrying leftovers between calls."""
        parts: list[torch.Tensor] = []
        have = 0
        while have < n:
            if self._leftover is not None and len(self._leftover):
                chunk, self._leftover = self._leftover, None
            else:
                chunk = next(self._chunks)
            need = n - have
            if len(chunk) > need:
                chunk, self._leftover = chunk[:need], chunk[need:]
            parts.append(chunk)
            have += len(chunk)
            if progress is not None:
                progress.update(len(chunk))
        return torch.cat(parts)

    def _fill(self, rows: torch.Tensor, progress: Progress | None = None) -> None:
        fresh = self._take(len(rows), progress)
        self.storage[rows] = fresh.to(self.storage.device, self.storage.dtype)

    def _reshuffle(self) -> None:
        perm = torch.randperm(self.size, generator=self.generator)
        self._order = perm.to(self.storage.device)
        self._pos = 0

    def peek(self, n: int) -> torch.Tensor:
        """n random rows of the current contents, without drawing them (for initialisation)."""
        n = min(n, self.size)
        rows = torch.randperm(self.size, generator=self.generator)[:n].to(self.storage.device)
        return self.storage[rows]

    def next_batch(self, n: int) -> torch.Tensor:
        """n activations drawn without replacement from the current contents."""
        if self.holds_all:
            if self._pos + n > self.size:
                raise ValueError(
                    f"batch of {n} after {self._pos} draws is more than the buffer holds "
                    f"({self.size}: every row the run was to draw)"
                )
            return self._draw(n)
        if n > self.size // 2:
            raise ValueError(f"batch of {n} is more than half the buffer ({self.size})")
        if self._pos + n > self.size // 2:
            self._fill(self._order[: self._pos])
            self._reshuffle()
            self.refills += 1
        return self._draw(n)

    def _draw(self, n: int) -> torch.Tensor:
        rows = self._order[self._pos : self._pos + n]
        self._pos += n
        self.tokens_served += n
        return self.storage[rows]
