"""Full evaluation of a (raw-scale) dictionary on held-out contexts."""

from __future__ import annotations

from collections.abc import Callable

import torch

from saetrain.activations.source import ActivationSource
from saetrain.activations.tokens import TokenBatch
from saetrain.dictionaries.base import Dictionary
from saetrain.evaluation.metrics import ReconstructionStats
from saetrain.evaluation.splice import spliced_lm_metrics


@torch.no_grad()
def evaluate_dictionary(
    source: ActivationSource,
    dictionary: Dictionary,
    batches: list[TokenBatch],
    input_site: str,
    target_site: str | None = None,
    compute_ce: bool = True,
    ce_contexts: int = 32,
    frequencies_out: list[torch.Tensor] | None = None,
    reduce: Callable[[ReconstructionStats], ReconstructionStats] | None = None,
) -> dict[str, float]:
    """FVU, MSE, L0, never-fired fraction on `batches`; CE/KL with the dictionary spliced in.

    Held-out tokens say which latents fired on them (`never_fired_fraction` over
    `never_fired_tokens`), not which are dead: that is the training window's verdict, which only
    the trainer knows (`training_dead_metrics`).

    An SAE reconstructs `input_site`; a transcoder predicts `target_site` from `input_site` and
    is spliced in place of the target site. `frequencies_out`, if given, receives each latent's
    firing frequency on the held-out tokens. `reduce` combines this process's statistics with
    other ranks' when each evaluated a share of the contexts (distributed/shared_eval.py).
    """
    target_site = target_site or input_site
    sites = [input_site] if target_site == input_site else [input_site, target_site]
    stats = ReconstructionStats(dictionary.n_latents, dictionary.d_out, dictionary.W_enc.device)
    for row in source.rows(iter(batches), sites, dictionary.W_enc.dtype):
        row = row.to(dictionary.W_enc.device)
        x = row[:, : dictionary.d_in]
        y = row[:, dictionary.d_in :] if len(sites) == 2 else x
        codes = dictionary.encode(x)
        stats.update(y, dictionary.reconstruct(x, codes), codes)
    if reduce is not None:
        stats = reduce(stats)
    metrics = stats.compute()
    if frequencies_out is not None:  # per-latent firing frequency, for density plots
        frequencies_out.append(stats.fire_counts.double().cpu() / max(stats.rows, 1))
    if compute_ce:
        ce_batches = first_contexts(batches, ce_contexts)
        metrics |= spliced_lm_metrics(
            source.model,
            source.sites[target_site],
            dictionary,
            ce_batches,
            input_site=source.sites[input_site] if len(sites) == 2 else None,
        )
    return metrics


def first_contexts(batches: list[TokenBatch], n: int) -> list[TokenBatch]:
    out: list[TokenBatch] = []
    for batch in batches:
        if n <= 0:
            break
        take = min(n, len(batch))
        out.append(TokenBatch(batch.input_ids[:take], batch.mask[:take]))
        n -= take
    return out
