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


def _limited(rows: Iterator[torch.Tensor], limit: int) -> Iterator[torch.Tensor]:
    """Stop once `limit` rows are out: the run needs no more, so the LM need not run ahead."""
    served = 0
    for chunk in rows:
        yield chunk
        served += chunk.shape[0]
        if served >= limit:
            return


class TrainingStream:
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
    ):
        self.source = source
        self.tokens = tokens
        self.sites = sites
        self.dtype = dtype
        self.lm_batch_contexts = lm_batch_contexts
        self.cache = cache
        self.writing = False
        self.lm_contexts = 0  # contexts the LM has run on (this run)
        self.lm_tokens = 0
        self.cached_tokens = 0  # rows read from the cache
        parts: list[Iterator[torch.Tensor]] = []
        if cache is not None:
            if cache.tokens:
                log.info(
                    "activation cache %s: reading %d cached tokens (%d shards)",
                    cache.folder,
                    cache.tokens,
                    len(cache.shards),
                )
                parts.append(self._cached(generator))
            self.writing = cache.acquire()
            if not self.writing:
                log.warning(
                    "activation cache %s is being written by another process; this run computes "
                    "what the cache lacks without writing it",
                    cache.folder,
                )
        parts.append(self._live())
        rows: Iterator[torch.Tensor] = itertools.chain(*parts)
        if limit_tokens is not None:
            rows = _limited(rows, limit_tokens)
        self._prefetcher = Prefetcher(rows, prefetch, source.device) if prefetch > 0 else None
        self._rows = self._prefetcher if self._prefetcher is not None else rows

    def _cached(self, generator: torch.Generator) -> Iterator[torch.Tensor]:
        assert self.cache is not None
        for rows in self.cache.read(generator):
            self.cached_tokens += rows.shape[0]
            yield rows

    def _live(self) -> Iterator[torch.Tensor]:
        skip = self.cache.contexts if self.cache is not None else 0
        if skip:
            log.info("LM: continuing the stream after the cache's %d contexts", skip)
        for batch in self.tokens.training(self.lm_batch_contexts, skip_contexts=skip):
            acts = self.source(batch.input_ids)
            mask = batch.mask.to(self.source.device)
            rows = torch.cat([acts[s][mask].to(self.dtype) for s in self.sites], dim=-1)
            self.lm_contexts += len(batch)
            self.lm_tokens += rows.shape[0]
            if self.writing:
                assert self.cache is not None
                self.cache.add(rows, len(batch))
            yield rows

    def __iter__(self) -> TrainingStream:
        return self

    def __next__(self) -> torch.Tensor:
        return next(self._rows)

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
