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
from saetrain.dictionaries.base import Codes, Dictionary, SparseCodes, TrainOutput, total_variance
from saetrain.dictionaries.jumprelu import jumprelu_saelens_name
from saetrain.dictionaries.topk import auxk_loss, gather_codes, select_dead


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
    chosen = chosen.sort().values  # by row (flat = row·n + latent), then by latent
    rows, cols = chosen // n, chosen % n
    counts = torch.bincount(rows, minlength=N)
    kmax = max(int(counts.max()), 1) if keep else 1
    slot = torch.arange(keep, device=pre.device) - (torch.cumsum(counts, 0) - counts)[rows]
    spread = torch.arange(N * kmax, device=pre.device).view(N, kmax) % n
    indices = spread.index_put_((rows, slot), cols)
    mask = torch.zeros(N, kmax, dtype=torch.bool, device=pre.device).index_put_(
        (rows, slot), torch.ones_like(rows, dtype=torch.bool)
    )
    return indices, mask, kept


class BatchTopKSAE(Dictionary):
    architecture = "batchtopk"
    transcoder_encoder_scale = 0.1  # k latents always fire

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
        super().__init__(d_in, n_latents, d_out, **kwargs)
        self.k = k
        self.aux_k = aux_k if aux_k is not None else d_in // 2
        self.aux_k_coefficient = aux_k_coefficient
        self.threshold_momentum = threshold_momentum
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        return pre * (pre > self.threshold).to(pre.dtype)  # compared in fp32

    def reconstruction_loss(
        self, x: torch.Tensor, target: torch.Tensor, z: Codes, total_variance: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, ŷ, logged terms): plain FVU here; Matryoshka sums it over prefixes."""
        x_hat = self.reconstruct(x, z)
        fvu = (target - x_hat).pow(2).sum() / total_variance
        return fvu, x_hat, {"fvu": fvu.detach()}

    def training_forward(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        dead_mask: torch.Tensor | None,
        sparsity_multiplier: float = 1.0,
    ) -> TrainOutput:
        x_in = self.encoder_input(x)
        with torch.no_grad():  # the one dense product; its backward is sparse (encode_gather)
            pre = x_in @ self.W_enc + self.b_enc
            indices, mask, kept = batch_topk(pre, self.k)
            aux = select_dead(pre, dead_mask, self.aux_k) if self.aux_k_coefficient > 0 else None
        values, aux_values = gather_codes(self, x_in, pre, indices, aux)
        z = SparseCodes(indices, values * mask)
        variance = total_variance(target)
        loss, x_hat, terms = self.reconstruction_loss(x, target, z, variance)
        if aux is not None:
            aux_term = auxk_loss(self, aux, aux_values, target - x_hat, variance)
            loss = loss + self.aux_k_coefficient * aux_term
            terms["auxk"] = aux_term.detach()
        # The smallest activation the selection kept (zeros pad the selection when fewer than
        # k·N pre-activations are positive).
        positive = kept[kept > 0]
        smallest = positive.min() if positive.numel() else kept.new_zeros(())
        terms["batch_threshold"] = smallest.detach()
        return TrainOutput(loss=loss, x_hat=x_hat, codes=z, terms=terms)

    @torch.no_grad()
    def after_step(self, out: TrainOutput) -> None:
        """θ ← running average of the smallest kept activation (the first batch sets it)."""
        observed = out.terms["batch_threshold"].float()
        if int(self.threshold_updates) == 0:
            self.threshold.copy_(observed)
        else:
            m = self.threshold_momentum
            self.threshold.mul_(m).add_((1 - m) * observed)
        self.threshold_updates += 1

    def saelens_architecture(self) -> str:
        return jumprelu_saelens_name(self)

    @classmethod
    def init_kwargs_from_config(cls, cfg: DictionaryConfig) -> dict[str, Any]:
        return {
            "k": cfg.k,
            "aux_k": cfg.aux_k,
            "aux_k_coefficient": cfg.aux_k_coefficient,
            "threshold_momentum": cfg.threshold_momentum,
        }

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            name: t.detach()
            for name, t in self.state_dict().items()
            if name not in ("threshold", "threshold_updates")
        }
        tensors["threshold"] = self.threshold.expand(self.n_latents).to(self.W_enc.dtype).clone()
        return tensors
