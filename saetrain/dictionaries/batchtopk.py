"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the k·N largest ReLU pre-activations across the whole batch of N rows, so a row
may use more or fewer than k latents while the batch averages k; AuxK revives dead latents as in
TopK. Inference cannot depend on the batch, so a threshold θ is estimated during training as the
running average (an exponential moving average) of the smallest activation the batch selection
keeps, and inference is z = pre·1[pre > θ]: a JumpReLU with one threshold for all latents. It is
exported as SAELens's "jumprelu" with `threshold` = θ for every latent.
"""

from __future__ import annotations

from typing import Any

import torch

from saetrain.config import DictionaryConfig
from saetrain.dictionaries.base import Dictionary, TrainOutput, total_variance
from saetrain.dictionaries.jumprelu import jumprelu_saelens_name
from saetrain.dictionaries.topk import auxk_loss


def batch_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense codes keeping the k·N largest ReLU pre-activations of the batch, the kept values)."""
    flat = pre.relu().flatten()
    keep = min(k * pre.shape[0], flat.numel())
    values, indices = flat.topk(keep, sorted=False)
    return torch.zeros_like(flat).scatter_(0, indices, values).view_as(pre), values


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
        self, x: torch.Tensor, target: torch.Tensor, z: torch.Tensor, total_variance: torch.Tensor
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
        pre = self.pre_activations(x)
        z, kept = batch_topk(pre, self.k)
        variance = total_variance(target)
        loss, x_hat, terms = self.reconstruction_loss(x, target, z, variance)
        if self.aux_k_coefficient > 0:
            aux = auxk_loss(self, pre, target - x_hat, variance, dead_mask, self.aux_k)
            if aux is not None:
                loss = loss + self.aux_k_coefficient * aux
                terms["auxk"] = aux.detach()
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
