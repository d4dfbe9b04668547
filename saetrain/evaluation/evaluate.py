"""Full evaluation of a (raw-scale) dictionary on held-out contexts."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from saetrain.activations.source import ActivationSource
from saetrain.activations.tokens import TokenBatch
from saetrain.dictionaries.base import Dictionary
from saetrain.evaluation.metrics import ReconstructionStats
from saetrain.evaluation.splice import Member, replacement_lm_metrics


@torch.no_grad()
def evaluate_dictionary(
    source: ActivationSource,
    dictionary: Dictionary,
    batches: list[TokenBatch],
    input_site: str | Sequence[str],
    target_site: str | Sequence[str] | None = None,
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
    is spliced in place of the target site. A dictionary on several sites (lists: a crosscoder's
    sources, a CLT's layers) also reports `fvu.<site>` per target site (and a CLT `l0.<layer>`
    per layer), and is spliced at all its targets at once (splice.py). `frequencies_out`, if
    given, receives each latent's firing frequency on the held-out tokens. `reduce` combines
    this process's statistics with other ranks' when each evaluated a share of the contexts
    (distributed/shared_eval.py).
    """
    inputs = [input_site] if isinstance(input_site, str) else list(input_site)
    if target_site is None:
        targets = list(inputs)
    else:
        targets = [target_site] if isinstance(target_site, str) else list(target_site)
    transcoder = targets != inputs
    sites = inputs + (targets if transcoder else [])
    widths = [source.width(site) for site in targets]
    stats = ReconstructionStats(dictionary.n_latents, dictionary.d_out, dictionary.W_enc.device)
    per_target = [ReconstructionStats(0, w, dictionary.W_enc.device) for w in widths]
    for row in source.rows(iter(batches), sites, dictionary.W_enc.dtype):
        row = row.to(dictionary.W_enc.device)
        x = row[:, : dictionary.d_in]
        y = row[:, dictionary.d_in :] if transcoder else x
        codes = dictionary.encode(x)
        y_hat = dictionary.reconstruct(x, codes)
        stats.update(y, y_hat, codes)
        if len(targets) > 1:
            none = y.new_zeros(y.shape[0], 0)
            start = 0
            for block, width in zip(per_target, widths, strict=True):
                block.update(y[:, start : start + width], y_hat[:, start : start + width], none)
                start += width
    if reduce is not None:
        stats = reduce(stats)
        per_target = [reduce(block) for block in per_target]
    metrics = stats.compute()
    if len(targets) > 1:
        for site, block in zip(targets, per_target, strict=True):
            metrics[f"fvu.{site}"] = block.compute()["fvu"]
    n_layers = getattr(dictionary, "n_layers", None)
    if n_layers is not None:  # a CLT: active latents of each layer per token
        per_layer = stats.fire_counts.reshape(n_layers, -1).sum(1).double() / max(stats.rows, 1)
        for site, l0 in zip(inputs, per_layer.tolist(), strict=True):
            metrics[f"l0.{site}"] = l0
    if frequencies_out is not None:  # per-latent firing frequency, for density plots
        frequencies_out.append(stats.fire_counts.double().cpu() / max(stats.rows, 1))
    if compute_ce:
        ce_batches = first_contexts(batches, ce_contexts)
        metrics |= replacement_lm_metrics(
            source.models, [splice_member(source, dictionary, inputs, targets)], ce_batches
        )
    return metrics


def splice_member(
    source: ActivationSource, dictionary: Dictionary, inputs: list[str], targets: list[str]
) -> Member:
    """A dictionary as one member of a replacement: a crosscoder reads its sources from the
    clean forward (it needs later layers); every other kind reads them as they arrive."""
    return Member(
        dictionary,
        [source.sites[site] for site in inputs],
        [source.sites[site] for site in targets],
        causal=dictionary.kind != "crosscoder",
    )


def first_contexts(batches: list[TokenBatch], n: int) -> list[TokenBatch]:
    out: list[TokenBatch] = []
    for batch in batches:
        if n <= 0:
            break
        take = min(n, len(batch))
        out.append(TokenBatch(batch.input_ids[:take], batch.mask[:take]))
        n -= take
    return out
