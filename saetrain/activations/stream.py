"""The training stream of activation rows that feeds the buffer.

Rows come from the activation cache when it holds them, then from the LM (and are written to the
cache on the way); both are produced `prefetch` LM batches ahead in a background thread. Each row
holds every site the run reads, side by side, at one unmasked token position. The stream ends
after the rows the run will draw, so neither the LM nor the cache runs past what training uses.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import torch

from saetrain.activations.cache import ActivationCache
from saetrain.activations.prefetch import Prefetcher
from saetrain.activations.source import ActivationSource
from saetrain.activations.tokens import TokenSource

log = logging.getLogger(__name__)


def _limited(
    items: Iterator[tuple[torch.Tensor, int]], limit: int
) -> Iterator[tuple[torch.Tensor, int]]:
    """Stop once `limit` rows are out: the run needs no more, so the LM need not run ahead."""
    served = 0
    while served < limit:
        item = next(items, None)
        if item is None:
            return
        yield item
        served += item[0].shape[0]


class TrainingStream:
    """Rows for the buffer, and the position in the stream a checkpoint needs to continue it."""

    def __init__(
        self,
        source: ActivationSource,
        tokens: TokenSource,
        sites: list[str],
        dtype: torch.dtype,
        lm_batch_contexts: int,
        cache: ActivationCache | None,
        prefetch: int,
        generator: torch.Generator,
        limit_tokens: int | None = None,
        position: dict[str, int] | None = None,
    ):
        self.source = source
        self.tokens = tokens
        self.sites = sites
        self.dtype = dtype
        self.lm_batch_contexts = lm_batch_contexts
        self.cache = cache
        self.writing = False
        self.lm_contexts = 0  # contexts the LM has run on (this process)
        self.lm_tokens = 0
        self.cached_tokens = 0  # rows read from the cache (this process)
        # What the consumer has taken since the run began (a resumed run starts from its
        # checkpoint's values): this, not what was computed ahead, is the stream's position.
        position = position or {}
        self.rows_out = int(position.get("rows_out", 0))
        self.contexts_out = int(position.get("contexts_out", 0))
        self.cached_chunks_out = int(position.get("cached_chunks_out", 0))
        if cache is not None:
            # First the lock: a new writer re-reads the manifest, so the shards counted next are
            # all there are.
            self.writing = cache.acquire()
            if not self.writing:
                log.warning(
                    "activation cache %s is being written by another process; this run computes "
                    "what the cache lacks without writing it",
                    cache.folder,
                )
        self.cache_shards = int(
            position.get("cache_shards", len(cache.shards) if cache is not None else 0)
        )
        parts: list[Iterator[tuple[torch.Tensor, int]]] = []
        if cache is not None:
            if self.cache_shards:
                log.info(
                    "activation cache %s: reading %d cached tokens (%d shards)",
                    cache.folder,
                    sum(s["tokens"] for s in cache.shards[: self.cache_shards]),
                    self.cache_shards,
                )
                parts.append(self._cached(generator))
        parts.append(self._live())
        items: Iterator[tuple[torch.Tensor, int]] = itertools.chain(*parts)
        if limit_tokens is not None:
            items = _limited(items, limit_tokens - self.rows_out)
        self._prefetcher = Prefetcher(items, prefetch, source.device) if prefetch > 0 else None
        self._items = self._prefetcher if self._prefetcher is not None else items

    def _cached(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, int]]:
        assert self.cache is not None
        for rows in self.cache.read(generator, self.cache_shards, self.cached_chunks_out):
            self.cached_tokens += rows.shape[0]
            # On the LM's device, as live rows are: with prefetch the copy runs ahead on the
            # producer's stream, and the consumer's stream bookkeeping sees device tensors only.
            yield rows.to(self.source.device), -1  # -1: a cached chunk, counted by chunks

    def _live(self) -> Iterator[tuple[torch.Tensor, int]]:
        cache = self.cache
        position = cache.contexts_of(self.cache_shards) if cache is not None else 0
        position += self.contexts_out
        if position:
            log.info("LM: continuing the stream after %d contexts", position)
        for batch in self.tokens.training(self.lm_batch_contexts, skip_contexts=position):
            acts = self.source(batch.input_ids)
            mask = batch.mask.to(self.source.device)
            rows = torch.cat([acts[s][mask].to(self.dtype) for s in self.sites], dim=-1)
            self.lm_contexts += len(batch)
            self.lm_tokens += rows.shape[0]
            # Rows are cached only where they extend the cache: a resumed run recomputes contexts
            # its killed predecessor may already have cached, and a stream that starts past the
            # cache's end (which would file its rows under the wrong contexts) writes nothing.
            if self.writing and cache is not None and position == cache.covered_contexts:
                cache.add(rows, len(batch))
            position += len(batch)
            yield rows, len(batch)

    def __iter__(self) -> TrainingStream:
        return self

    def __next__(self) -> torch.Tensor:
        rows, contexts = next(self._items)
        self.rows_out += rows.shape[0]
        if contexts < 0:
            self.cached_chunks_out += 1
        else:
            self.contexts_out += contexts
        return rows

    def position(self) -> dict[str, int]:
        """Where the consumer is: a new stream built with this continues right after it."""
        return {
            "rows_out": self.rows_out,
            "contexts_out": self.contexts_out,
            "cached_chunks_out": self.cached_chunks_out,
            "cache_shards": self.cache_shards,
        }

    def queued(self) -> list[torch.Tensor]:
        """Rows computed ahead and not yet taken (counted in the buffer's memory)."""
        return self._prefetcher.queued() if self._prefetcher is not None else []

    def close(self) -> None:
        """Stop the background thread; write the cache's last partial shard and unlock it."""
        if self._prefetcher is not None:
            self._prefetcher.close()
        if self.cache is not None and self.writing:
            self.cache.release()
            self.writing = False
