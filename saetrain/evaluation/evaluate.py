"""Full evaluation of a (raw-scale) dictionary on held-out contexts."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from saetrain.activations.source import ActivationSource
from saetrain.activations.tokens import TokenBatch
from saetrain.dictionaries.base import Dictionary
from saetrain.evaluation.metrics import ReconstructionStats
from saetrain.evaluation.splice import Member, replacement_lm_metrics


@dataclass
class Evaluated:
    """One dictionary of a held-out evaluation: it reads `inputs` and predicts `targets` (the
    inputs again for an SAE or a crosscoder)."""

    dictionary: Dictionary
    inputs: list[str]
    targets: list[str]

    @property
    def transcoder(self) -> bool:
        return self.targets != self.inputs

    @property
    def sites(self) -> list[str]:
        """The sites of its rows, side by side: the inputs, then a transcoder's targets."""
        return self.inputs + (self.targets if self.transcoder else [])


def _as_list(sites: str | Sequence[str] | None) -> list[str] | None:
    return None if sites is None else [sites] if isinstance(sites, str) else list(sites)


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
    (evaluation/shared_eval.py).
    """
    inputs = _as_list(input_site)
    assert inputs is not None
    member = Evaluated(dictionary, inputs, _as_list(target_site) or list(inputs))
    [(metrics, frequencies)] = evaluate_dictionaries(source, [member], batches, reduce)
    if frequencies_out is not None:  # per-latent firing frequency, for density plots
        frequencies_out.append(frequencies)
    if compute_ce:
        ce_batches = first_contexts(batches, ce_contexts)
        metrics |= replacement_lm_metrics(
            source.models,
            [splice_member(source, dictionary, member.inputs, member.targets)],
            ce_batches,
        )
    return metrics


@torch.no_grad()
def evaluate_dictionaries(
    source: ActivationSource,
    members: Sequence[Evaluated],
    batches: Iterable[TokenBatch],
    reduce: Callable[[ReconstructionStats], ReconstructionStats] | None = None,
) -> list[tuple[dict[str, float], torch.Tensor]]:
    """`evaluate_dictionary`'s reconstruction metrics (no CE) for every member from one pass of
    the LM over `batches`: each batch's activations are read once, at every member's sites, and
    each member is scored on its own rows of them (in its own dtype, as a pass of its own would
    read them: the numbers are the same). Returns per member (metrics, firing frequency of each
    latent on the held-out tokens)."""
    scores = [_Scores(source, member) for member in members]
    groups = [(member.sites, member.dictionary.W_enc.dtype) for member in members]
    for rows in source.row_groups(iter(batches), groups):
        for score, row in zip(scores, rows, strict=True):
            score.update(row)
    return [score.finish(reduce) for score in scores]


class _Scores:
    """One member's running statistics: the whole dictionary, and each target of several."""

    def __init__(self, source: ActivationSource, member: Evaluated):
        self.member = member
        dictionary = member.dictionary
        device = dictionary.W_enc.device
        self.widths = [source.width(site) for site in member.targets]
        self.stats = ReconstructionStats(dictionary.n_latents, dictionary.d_out, device)
        self.per_target = [ReconstructionStats(0, w, device) for w in self.widths]

    def update(self, row: torch.Tensor) -> None:
        dictionary = self.member.dictionary
        row = row.to(dictionary.W_enc.device)
        x = row[:, : dictionary.d_in]
        y = row[:, dictionary.d_in :] if self.member.transcoder else x
        codes = dictionary.encode(x)
        y_hat = dictionary.reconstruct(x, codes)
        self.stats.update(y, y_hat, codes)
        if len(self.widths) > 1:
            none = y.new_zeros(y.shape[0], 0)
            start = 0
            for block, width in zip(self.per_target, self.widths, strict=True):
                block.update(y[:, start : start + width], y_hat[:, start : start + width], none)
                start += width

    def finish(
        self, reduce: Callable[[ReconstructionStats], ReconstructionStats] | None
    ) -> tuple[dict[str, float], torch.Tensor]:
        stats, per_target = self.stats, self.per_target
        if reduce is not None:
            stats = reduce(stats)
            per_target = [reduce(block) for block in per_target]
        metrics = stats.compute()
        if len(per_target) > 1:
            for site, block in zip(self.member.targets, per_target, strict=True):
                metrics[f"fvu.{site}"] = block.compute()["fvu"]
        n_layers = getattr(self.member.dictionary, "n_layers", None)
        if n_layers is not None:  # a CLT: active latents of each layer per token
            per_layer = stats.fire_counts.reshape(n_layers, -1).sum(1).double()
            per_layer = per_layer / max(stats.rows, 1)
            for site, l0 in zip(self.member.inputs, per_layer.tolist(), strict=True):
                metrics[f"l0.{site}"] = l0
        return metrics, stats.fire_counts.double().cpu() / max(stats.rows, 1)


def splice_member(
    source: ActivationSource, dictionary: Dictionary, inputs: list[str], targets: list[str]
) -> Member:
    """A dictionary as one member of a replacement: a crosscoder reads its sources from the
    clean forward (it needs later layers); every other kind reads them as they arrive."""
    return Member(
        dictionary,
        [source.sites[site] for site in inputs],
        [source.sites[site] for site in targets],
        causal=dictionary.causal_splice,
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
