"""ReLU SAE with an L1 penalty weighted by decoder norms (Anthropic, "Towards Monosemanticity" and
its April 2024 update).

z = ReLU((x − b_dec)·W_enc + b_enc); loss = Σ‖y − ŷ‖²/N + λ·Σ_i z_i·‖W_dec,i‖ / N, with λ warmed
up from 0. Decoder rows are free (no unit-norm constraint): weighting the penalty by their norms
removes the incentive to shrink codes by growing rows. Exported as SAELens's "standard" (or
"transcoder" / "skip_transcoder").
"""

from __future__ import annotations

from typing import Any

import torch

from saetrain.config import DictionaryConfig
from saetrain.dictionaries.base import Dictionary, TrainOutput, squared_error


class ReLUSAE(Dictionary):
    architecture = "relu"
    shards_latents = True  # elementwise: its sums over latents go through sum_over_latents
    unit_norm_decoder = False

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        d_out: int | None = None,
        sparsity_coefficient: float = 5.0,
        target_l0: float | None = None,
        **kwargs: Any,
    ):
        super().__init__(d_in, n_latents, d_out, **kwargs)
        self.sparsity_coefficient = sparsity_coefficient
        self.target_l0 = target_l0  # λ is adapted towards it by the trainer's L0 controller

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_activations(x).relu()

    def training_forward(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        dead_mask: torch.Tensor | None,
        sparsity_multiplier: float = 1.0,
    ) -> TrainOutput:
        z = self.encode(x)
        x_hat = self.reconstruct(x, z)
        mse = squared_error(target, x_hat)
        l1 = self.sum_over_latents((z * self.decoder_norms()).sum(-1)).mean()
        loss = mse + sparsity_multiplier * self.sparsity_coefficient * l1
        return TrainOutput(loss, x_hat, z, {"mse": mse.detach(), "l1": l1.detach()})

    @torch.no_grad()
    def shift_sparsity(self, amount: float) -> None:
        """b_enc ← b_enc − amount·‖W_enc,i‖: each bias moves by `amount` of its latent's
        pre-activation scale."""
        self.b_enc -= amount * self.encoder_norms().to(self.b_enc.dtype)

    def saelens_architecture(self) -> str:
        if not self.transcoder:
            return "standard"
        return "skip_transcoder" if self.W_skip is not None else "transcoder"

    @classmethod
    def init_kwargs_from_config(cls, cfg: DictionaryConfig) -> dict[str, Any]:
        return {"sparsity_coefficient": cfg.sparsity_coefficient, "target_l0": cfg.target_l0}
