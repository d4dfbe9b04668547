"""The LM's next-token loss with dictionaries spliced in, clean and zero-ablated.

One dictionary at one site (an SAE, a transcoder), or a whole replacement at once: every
transcoder of a set, a CLT at all its layers, a crosscoder at all its sources. Each *member* of
a replacement maps its input sites to its target sites; the targets are replaced by its
predictions in one forward, and the baseline zero-ablates every target.

- A causal member (an SAE, a transcoder, a CLT) reads its inputs in the replaced forward itself,
  as they arrive (so upstream replacements propagate, as in a replacement model); a target's
  prediction uses the inputs read so far, the later ones as zeros: a CLT's latents of layer ℓ
  write only to layers ≥ ℓ, so the prediction of layer ℓ' is exact.
- A crosscoder reads every source, later layers included: its inputs come from the clean
  forward, and its reconstructions replace all its sources at once (with two models, model
  diffing, each model's sources in its own forward).

Positions holding special tokens (BOS, separators) keep their original activations — the
dictionaries never trained on them — and predictions from or of those positions are not counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from saetrain.activations.sites import ResolvedSite, register_site_hook
from saetrain.activations.tokens import TokenBatch
from saetrain.evaluation.metrics import ce_recovered

Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Member:
    """One dictionary of a replacement: rows [x_1 … x_S] of its inputs → [y_1 … y_T]."""

    predict: Predictor
    inputs: Sequence[ResolvedSite]
    targets: Sequence[ResolvedSite]
    causal: bool = True

    @property
    def in_widths(self) -> list[int]:
        return [site.width for site in self.inputs]

    @property
    def out_widths(self) -> list[int]:
        return [site.width for site in self.targets]


def _masked_replace(
    mask: torch.Tensor, replace: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask[..., None], replace(x).to(x.dtype), x)

    return hook


def _block(y: torch.Tensor, widths: list[int], j: int) -> torch.Tensor:
    start = sum(widths[:j])
    return y[..., start : start + widths[j]]


class _Replacement:
    """The hooks of one replaced forward (see the module docstring)."""

    def __init__(self, members: Sequence[Member], mask: torch.Tensor):
        self.members = members
        self.mask = mask
        self.captured: list[dict[int, torch.Tensor]] = [{} for _ in members]
        self.clean: list[torch.Tensor | None] = [None for _ in members]

    def capture_clean(self) -> list[tuple[ResolvedSite, Callable]]:
        """Hooks that read the acausal members' inputs in the clean forward."""
        hooks = []
        for m, member in enumerate(self.members):
            if member.causal:
                continue
            for i, site in enumerate(member.inputs):
                hooks.append((site, self._store(m, i)))
        return hooks

    def _store(self, m: int, i: int) -> Callable[[torch.Tensor], None]:
        def hook(x: torch.Tensor) -> None:
            self.captured[m][i] = x

        return hook

    def finish_clean(self) -> None:
        """The acausal members' predictions from the clean inputs, before the replaced forward."""
        for m, member in enumerate(self.members):
            if not member.causal:
                self.clean[m] = member.predict(self._inputs(m))
                self.captured[m] = {}

    def _inputs(self, m: int) -> torch.Tensor:
        """[.., Σ widths]: the inputs read so far, zeros for those not read yet."""
        member, got = self.members[m], self.captured[m]
        like = next(iter(got.values()))
        parts = [
            got[i] if i in got else like.new_zeros(*like.shape[:-1], w)
            for i, w in enumerate(member.in_widths)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def replace(self) -> list[tuple[ResolvedSite, Callable]]:
        """Hooks of the replaced forward: read causal inputs, replace every target."""
        hooks: dict[int, tuple[ResolvedSite, list[Callable]]] = {}

        def add(site: ResolvedSite, fn: Callable) -> None:
            hooks.setdefault(id(site.module) * 31 + hash(site.site), (site, []))[1].append(fn)

        for m, member in enumerate(self.members):
            if member.causal:
                for i, site in enumerate(member.inputs):
                    add(site, self._store(m, i))
            for j, site in enumerate(member.targets):
                add(site, _masked_replace(self.mask, self._predictor(m, j)))
        # Several functions at one site run in order (read before replace), one hook per site.
        return [(site, _chain(fns)) for site, fns in hooks.values()]

    def _predictor(self, m: int, j: int) -> Callable[[torch.Tensor], torch.Tensor]:
        member = self.members[m]

        def predict(_: torch.Tensor) -> torch.Tensor:
            y = self.clean[m] if not member.causal else member.predict(self._inputs(m))
            assert y is not None
            return _block(y, member.out_widths, j)

        return predict


def _chain(fns: list[Callable]) -> Callable[[torch.Tensor], torch.Tensor | None]:
    def hook(x: torch.Tensor) -> torch.Tensor | None:
        out = None
        for fn in fns:
            new = fn(x if out is None else out)
            out = new if new is not None else out
        return out

    return hook


def _zero_targets(members: Sequence[Member], mask: torch.Tensor) -> list[tuple]:
    sites = {id(s.module) * 31 + hash(s.site): s for m in members for s in m.targets}
    return [(site, _masked_replace(mask, torch.zeros_like)) for site in sites.values()]


def _logits_at_valid(
    model: torch.nn.Module,
    ids: torch.Tensor,
    valid: torch.Tensor,
    hooks: list[tuple[ResolvedSite, Callable]],
) -> torch.Tensor:
    """Next-token log-probabilities [n_valid, vocab] (float32), with `hooks` at their sites."""
    handles = [register_site_hook(site, fn) for site, fn in hooks]
    try:
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits[:, :-1].reshape(-1, logits.shape[-1])[valid].float().log_softmax(-1)


@torch.no_grad()
def replacement_lm_metrics(
    models: torch.nn.Module | Sequence[torch.nn.Module],
    members: Sequence[Member],
    batches: Iterable[TokenBatch],
) -> dict[str, float]:
    """CE clean / replaced / every target zero-ablated, ΔCE, CE recovered and KL(clean ‖
    replaced), per token, with every member's targets replaced at once.

    With two models (a model-diffing crosscoder's sources in both), every clean forward runs
    first, then each model is scored with its own targets replaced; model b's numbers carry the
    suffix `@b` (`ce_spliced@b`).
    """
    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    device = next(models[0].parameters()).device
    sums = [{"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0} for _ in models]
    count = 0
    for batch in batches:
        ids = batch.input_ids.to(device)
        mask = batch.mask.to(device)
        valid = (mask[:, :-1] & mask[:, 1:]).reshape(-1)
        targets = ids[:, 1:].reshape(-1)[valid]
        replacement = _Replacement(members, mask)
        clean = [_logits_at_valid(m, ids, valid, replacement.capture_clean()) for m in models]
        replacement.finish_clean()
        for i, model in enumerate(models):
            spliced = _logits_at_valid(model, ids, valid, replacement.replace())
            zero = _logits_at_valid(model, ids, valid, _zero_targets(members, mask))
            for name, log_probs in (("clean", clean[i]), ("spliced", spliced), ("zero", zero)):
                sums[i][name] -= float(log_probs.gather(1, targets[:, None]).double().sum())
            kl = (clean[i].exp() * (clean[i] - spliced)).sum(-1).double().sum()
            sums[i]["kl"] += float(kl)
        count += int(valid.sum())
    if count == 0:
        raise ValueError("no valid next-token positions in the CE evaluation batches")
    out: dict[str, float] = {}
    for i, model_sums in enumerate(sums):
        ce = {name: total / count for name, total in model_sums.items()}
        suffix = "" if i == 0 else "@b"
        out |= {
            f"ce_clean{suffix}": ce["clean"],
            f"ce_spliced{suffix}": ce["spliced"],
            f"ce_zero_ablated{suffix}": ce["zero"],
            f"delta_ce{suffix}": ce["spliced"] - ce["clean"],
            f"ce_recovered{suffix}": ce_recovered(ce["clean"], ce["spliced"], ce["zero"]),
            f"kl_div{suffix}": ce["kl"],
        }
    out["ce_tokens"] = float(count)
    return out


def spliced_lm_metrics(
    model: torch.nn.Module,
    site: ResolvedSite,
    dictionary: Predictor,
    batches: Iterable[TokenBatch],
    input_site: ResolvedSite | None = None,
) -> dict[str, float]:
    """One dictionary at one site: an SAE replaces `site` by its reconstruction; with
    `input_site`, a transcoder replaces `site` by its prediction from `input_site`."""
    member = Member(dictionary, [input_site or site], [site])
    return replacement_lm_metrics(model, [member], batches)
