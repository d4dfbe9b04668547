"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the k·N largest ReLU pre-activations across the whole batch of N rows, so a row
may use more or fewer than k latents while the batch averages k; AuxK revives dead latents as in
TopK. Inference cannot depend on the batch, so a threshold θ is estimated during training as the
running average (an exponential moving average) of the smallest activation the batch selection
keeps, and inference is z = pre·1[pre > θ]: a JumpReLU with one threshold for all latents. It is
exported as SAELens's "jumprelu" with `threshold` = θ for every latent.

Training codes travel sparse, padded to the batch's largest per-row count (`batch_topk`), so the
decoder and the encoder's backward are O(N·kmax·d) through saetrain.kernels.ops.
"""

from __future__ import annotations

from typing import Any

import torch

from saetrain.config import DictionaryConfig
from saetrain.dictionaries.base import LatentSplit, TrainOutput
from saetrain.dictionaries.jumprelu import jumprelu_saelens_name
from saetrain.dictionaries.topk import TopKSAE


def batch_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k·N largest ReLU pre-activations of the batch, as padded per-row indices.

    Returns (indices [N, kmax], mask [N, kmax] of real slots, the kept values [k·N]); kmax is the
    largest count any row got. Rows are sorted by latent; a padded slot gets an index spread over
    the latents (so no single latent's segment collects every pad in the backward) and its value
    must be zeroed by the caller (`mask`). Costs one host sync (kmax).
    """
    N, n = pre.shape
    flat = pre.relu().flatten()
    keep = min(k * N, flat.numel())
    kept, chosen = flat.topk(keep, sorted=False)
    indices, mask = padded_rows(chosen, N, n)
    return indices, mask, kept


def split_batch_topk(
    pre: torch.Tensor, k: int, split: LatentSplit
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`batch_topk` over every shard of the latents: this shard's k·N largest ReLU
    pre-activations merged with the others' (a global winner is in its shard's list); returns
    this shard's winners padded per row like batch_topk, and every kept value."""
    N, n_local = pre.shape
    flat = pre.relu().flatten()
    values, index = flat.topk(min(k * N, flat.numel()), sorted=False)
    # global flat position: row·n + global latent
    index = (index // n_local) * split.n_latents + index % n_local + split.start
    kept, winners = split.merge_top(values[None], index[None], min(k * N, N * split.n_latents))
    kept, winners = kept[0].to(pre.dtype), winners[0]
    rows, cols = winners // split.n_latents, winners % split.n_latents
    mine = (cols >= split.start) & (cols < split.start + n_local)
    indices, mask = padded_rows(rows[mine] * n_local + cols[mine] - split.start, N, n_local)
    return indices, mask, kept


def padded_rows(chosen: torch.Tensor, N: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [N, kmax], mask [N, kmax]) of the flat positions `chosen` (row·n + latent) of an
    [N, n] batch, each row's latents in order and padded as `batch_topk` says."""
    chosen = chosen.sort().values  # by row (flat = row·n + latent), then by latent
    rows, cols = chosen // n, chosen % n
    counts = torch.bincount(rows, minlength=N)
    kmax = max(int(counts.max()), 1) if chosen.numel() else 1
    slot = (
        torch.arange(len(chosen), device=chosen.device) - (torch.cumsum(counts, 0) - counts)[rows]
    )
    spread = torch.arange(N * kmax, device=chosen.device).view(N, kmax) % n
    indices = spread.index_put_((rows, slot), cols)
    mask = torch.zeros(N, kmax, dtype=torch.bool, device=chosen.device).index_put_(
        (rows, slot), torch.ones_like(rows, dtype=torch.bool)
    )
    return indices, mask


@torch.no_grad()
def average_threshold(
    threshold: torch.Tensor, updates: torch.Tensor, observed: torch.Tensor, momentum: float
) -> None:
    """threshold ← momentum·threshold + (1 − momentum)·observed, or observed on the first update
    (`updates` == 0); `updates` += 1. Chosen on the device: no host read of `updates` per step."""
    averaged = threshold * momentum + (1 - momentum) * observed
    threshold.copy_(torch.where(updates == 0, observed, averaged))
    updates += 1


class BatchTopKSAE(TopKSAE):
    """TopK's training step with the selection made across the batch, and a threshold encoder."""

    architecture = "batchtopk"
    selects_per_batch = True

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        d_out: int | None = None,
        k: int = 32,
        aux_k: int | None = None,
        aux_k_coefficient: float = 1 / 32,
        threshold_momentum: float = 0.9,
        **kwargs: Any,
    ):
        super().__init__(d_in, n_latents, d_out, k, aux_k, aux_k_coefficient, **kwargs)
        self.threshold_momentum = threshold_momentum
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        pre = self.pre_activations(x)
        return pre * (pre > self.threshold).to(pre.dtype)  # compared in fp32

    def training_selection(
        self, pre: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        if self.latent_split is None:
            indices, mask, kept = batch_topk(pre, self.k)
        else:
            indices, mask, kept = split_batch_topk(pre, self.k, self.latent_split)
        # The smallest activation the selection kept (zeros pad the selection when fewer than
        # k·N pre-activations are positive): after_step averages it into the threshold.
        positive = kept[kept > 0]
        smallest = positive.min() if positive.numel() else kept.new_zeros(())
        return indices, mask, {"batch_threshold": smallest.detach()}

    @torch.no_grad()
    def after_step(self, out: TrainOutput) -> None:
        """θ ← running average of the smallest kept activation (the first batch sets it)."""
        average_threshold(
            self.threshold, self.threshold_updates, out.terms["batch_threshold"].float(),
            self.threshold_momentum,
        )  # fmt: skip

    def saelens_architecture(self) -> str:
        return jumprelu_saelens_name(self)

    def saelens_fields(self) -> dict[str, Any]:
        return {}  # saved as the JumpReLU it is at inference: no `k`

    @classmethod
    def init_kwargs_from_config(cls, cfg: DictionaryConfig) -> dict[str, Any]:
        return super().init_kwargs_from_config(cfg) | {"threshold_momentum": cfg.threshold_momentum}

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            name: t.detach()
            for name, t in self.state_dict().items()
            if name not in ("threshold", "threshold_updates")
        }
        tensors["threshold"] = self.threshold.expand(self.n_latents).to(self.W_enc.dtype).clone()
        return tensors
