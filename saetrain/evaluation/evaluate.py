"""Full evaluation of a (raw-scale) dictionary on held-out contexts."""

from __future__ import annotations

import torch

from saetrain.activations.source import ActivationSource
from saetrain.activations.tokens import TokenBatch
from saetrain.dictionaries.base import Dictionary
from saetrain.evaluation.metrics import ReconstructionStats
from saetrain.evaluation.splice import spliced_lm_metrics


@torch.no_grad()
def evaluate_dictionary(
    source: ActivationSource,
    site: str,
    dictionary: Dictionary,
    batches: list[TokenBatch],
    compute_ce: bool = True,
    ce_contexts: int = 32,
) -> dict[str, float]:
    """FVU, MSE, L0, dead fraction on `batches`; CE/KL with the dictionary spliced in."""
    stats = ReconstructionStats(dictionary.n_latents, dictionary.d_out, dictionary.W_enc.device)
    dtype = dictionary.W_enc.dtype
    for batch in batches:
        for x in source.flat(iter([batch]), site, dtype):
            x = x.to(dictionary.W_enc.device)
            codes = dictionary.encode(x)
            stats.update(x, dictionary.decode(codes), codes)
    metrics = stats.compute()
    if compute_ce:
        ce_batches = _first_contexts(batches, ce_contexts)
        metrics |= spliced_lm_metrics(source.model, source.sites[site], dictionary, ce_batches)
    return metrics


def _first_contexts(batches: list[TokenBatch], n: int) -> list[TokenBatch]:
    out: list[TokenBatch] = []
    for batch in batches:
        if n <= 0:
            break
        take = min(n, len(batch))
        out.append(TokenBatch(batch.input_ids[:take], batch.mask[:take]))
        n -= take
    return out
