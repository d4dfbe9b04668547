"""The LM's next-token loss with a dictionary spliced in at a site, clean and zero-ablated.

Positions holding special tokens (BOS, separators) keep their original activations — the
dictionary never trained on them — and predictions from or of those positions are not counted.
A transcoder replaces its target site with its prediction from the input site, read earlier in the
same forward (so upstream splicing effects propagate, as they would in a replacement model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from saetrain.activations.sites import ResolvedSite, register_site_hook
from saetrain.activations.tokens import TokenBatch
from saetrain.evaluation.metrics import ce_recovered


def _masked_replace(
    mask: torch.Tensor, replace: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask[..., None], replace(x).to(x.dtype), x)

    return hook


def _logits_at_valid(
    model: torch.nn.Module,
    ids: torch.Tensor,
    valid: torch.Tensor,
    site: ResolvedSite,
    replace: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """Next-token log-probabilities [n_valid, vocab] (float32), with `replace` at the site."""
    handle = register_site_hook(site, replace) if replace is not None else None
    try:
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    return logits[:, :-1].reshape(-1, logits.shape[-1])[valid].float().log_softmax(-1)


@torch.no_grad()
def spliced_lm_metrics(
    model: torch.nn.Module,
    site: ResolvedSite,
    dictionary: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[TokenBatch],
    input_site: ResolvedSite | None = None,
) -> dict[str, float]:
    """CE clean / spliced / zero-ablated, ΔCE, CE recovered and KL(clean ‖ spliced), per token.

    With `input_site`, `dictionary` maps that site's activation to `site`'s (a transcoder).
    """
    device = next(model.parameters()).device
    if input_site is None:
        return _spliced_lm_metrics(model, site, dictionary, batches, device)
    captured: dict[str, torch.Tensor] = {}

    def capture(x: torch.Tensor) -> None:
        captured["x"] = x

    def predict(_: torch.Tensor) -> torch.Tensor:
        return dictionary(captured["x"])

    handle = register_site_hook(input_site, capture)
    try:
        return _spliced_lm_metrics(model, site, predict, batches, device)
    finally:
        handle.remove()


def _spliced_lm_metrics(
    model: torch.nn.Module,
    site: ResolvedSite,
    predict: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[TokenBatch],
    device: torch.device,
) -> dict[str, float]:
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    count = 0
    for batch in batches:
        ids = batch.input_ids.to(device)
        mask = batch.mask.to(device)
        valid = (mask[:, :-1] & mask[:, 1:]).reshape(-1)
        targets = ids[:, 1:].reshape(-1)[valid]
        clean = _logits_at_valid(model, ids, valid, site, None)
        spliced = _logits_at_valid(model, ids, valid, site, _masked_replace(mask, predict))
        zero = _logits_at_valid(model, ids, valid, site, _masked_replace(mask, torch.zeros_like))
        for name, log_probs in (("clean", clean), ("spliced", spliced), ("zero", zero)):
            sums[name] -= float(log_probs.gather(1, targets[:, None]).double().sum())
        sums["kl"] += float((clean.exp() * (clean - spliced)).sum(-1).double().sum())
        count += int(valid.sum())
    if count == 0:
        raise ValueError("no valid next-token positions in the CE evaluation batches")
    ce = {name: total / count for name, total in sums.items()}
    return {
        "ce_clean": ce["clean"],
        "ce_spliced": ce["spliced"],
        "ce_zero_ablated": ce["zero"],
        "delta_ce": ce["spliced"] - ce["clean"],
        "ce_recovered": ce_recovered(ce["clean"], ce["spliced"], ce["zero"]),
        "kl_div": ce["kl"],
        "ce_tokens": float(count),
    }
