"""Activations for a dataset, batch by batch: what a notebook reads without training.

The rows a run trains on (`split="train"`: its training stream, through the activation cache
when there is one, so a later run with the same key reads them too) or evaluates on
(`"held_out"`: its held-out contexts, in its order, so numbers computed on them match the run's),
one row per unmasked token, re-cut into batches of `batch_rows`. Nothing is held but one batch
and one LM batch, and a progress line (rows, rate, ETA) shows the work as a run's phases do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from saetrain.activations.cache import ActivationCache
from saetrain.activations.source import ActivationSource
from saetrain.activations.stream import TrainingStream
from saetrain.activations.tokens import TokenSource
from saetrain.errors import ConfigError
from saetrain.progress import Progress

log = logging.getLogger(__name__)

SPLITS = ("train", "held_out")


def check_request(sites: list[str], n_tokens: int, split: str, batch_rows: int) -> None:
    """Refuse a request that cannot be served, naming the argument, before any model loads."""
    if not sites:
        raise ConfigError("sites: name at least one site (e.g. resid_post.6)")
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}; choose one of: {', '.join(SPLITS)}")
    for name, value in (("n_tokens", n_tokens), ("batch_rows", batch_rows)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")


def _rows(
    source: ActivationSource,
    tokens: TokenSource,
    sites: list[str],
    split: str,
    n_tokens: int,
    dtype: torch.dtype,
    lm_batch_contexts: int,
    cache: ActivationCache | None,
    seed: int,
) -> Iterator[torch.Tensor]:
    """Chunks of rows ([n, Σ width], the sites side by side), in the run's order, until
    `n_tokens` rows are out or the held-out split ends."""
    if split == "held_out":
        yield from source.rows(tokens.held_out_stream(lm_batch_contexts), sites, dtype)
        return
    # The training stream as a run builds it (the same cache key, the same cached-shard order).
    stream = TrainingStream(
        source, tokens, sites, dtype, lm_batch_contexts, cache, prefetch=0,
        generator=torch.Generator().manual_seed(seed + 1), limit_tokens=n_tokens,
    )  # fmt: skip
    try:
        yield from stream
    finally:
        stream.close()  # the cache's last partial shard is written, its lock released


def collect(
    source: ActivationSource,
    tokens: TokenSource,
    sites: list[str],
    n_tokens: int,
    split: str = "train",
    batch_rows: int = 4096,
    dtype: torch.dtype = torch.float32,
    lm_batch_contexts: int = 16,
    cache: ActivationCache | None = None,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of `batch_rows` rows (the last may be smaller) as {site: [rows, width]}, up to
    `n_tokens` rows in all. The LM runs only as far as the batches taken: stopping early (break,
    close) stops it, and writes what the cache has pending."""
    check_request(sites, n_tokens, split, batch_rows)
    columns: dict[str, slice] = {}
    start = 0
    for site in sites:
        columns[site] = slice(start, start + source.width(site))
        start = columns[site].stop

    def split_sites(rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {site: rows[:, cut].contiguous() for site, cut in columns.items()}

    chunks = _rows(source, tokens, sites, split, n_tokens, dtype, lm_batch_contexts, cache, seed)
    pending: list[torch.Tensor] = []
    have = served = 0
    with Progress(f"activations ({split})", n_tokens, "rows") as progress:
        try:
            for chunk in chunks:
                chunk = chunk[: n_tokens - served - have]
                pending.append(chunk)
                have += chunk.shape[0]
                while have >= batch_rows:
                    rows = torch.cat(pending)
                    rest = rows[batch_rows:]
                    pending, have = ([rest] if rest.shape[0] else []), rest.shape[0]
                    served += batch_rows
                    progress.update(batch_rows)
                    yield split_sites(rows[:batch_rows])
                if served + have >= n_tokens:
                    break
            if have:
                served += have
                progress.update(have)
                yield split_sites(torch.cat(pending))
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
    if served < n_tokens:
        log.warning(
            "activations (%s): the split ended after %d of the %d rows asked for", split, served,
            n_tokens,
        )  # fmt: skip
