"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

Two paths share W_enc: a gate decides which latents are active, a magnitude path how much.
    π_gate = x̃·W_enc + b_gate,   π_mag = x̃·(W_enc ⊙ exp(r_mag)) + b_mag,   x̃ = x − b_dec
    z = 1[π_gate > 0] ⊙ ReLU(π_mag)
loss = Σ‖y − ŷ(z)‖²/N + λ·Σ_i ReLU(π_gate)_i·‖W_dec,i‖/N + Σ‖y − ŷ_frozen(ReLU(π_gate))‖²/N,
where ŷ_frozen decodes through a detached copy of W_dec and b_dec, as the paper specifies: the
auxiliary term trains the gate to reconstruct, without pulling the decoder. Exported as SAELens's
"gated" (W_enc, b_gate, r_mag, b_mag, W_dec, b_dec).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from saetrain.config import DictionaryConfig
from saetrain.dictionaries.base import Dictionary, TrainOutput, squared_error


class GatedSAE(Dictionary):
    architecture = "gated"
    shards_latents = True  # elementwise: its sums over latents go through sum_over_latents

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        d_out: int | None = None,
        sparsity_coefficient: float = 1.0,
        target_l0: float | None = None,
        **kwargs: Any,
    ):
        super().__init__(d_in, n_latents, d_out, **kwargs)
        self.sparsity_coefficient = sparsity_coefficient
        self.target_l0 = target_l0  # λ is adapted towards it by the trainer's L0 controller
        del self.b_enc  # the gate and magnitude paths have their own biases
        opts = {"dtype": self.W_enc.dtype, "device": self.W_enc.device}
        self.b_gate = nn.Parameter(torch.zeros(n_latents, **opts))
        self.b_mag = nn.Parameter(torch.zeros(n_latents, **opts))
        self.r_mag = nn.Parameter(torch.zeros(n_latents, **opts))

    def _centred(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder_input(x)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's pre-activations (what decides which latents are active)."""
        return self._centred(x) @ self.W_enc + self.b_gate

    def _paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_in = self._centred(x)
        pi_gate = x_in @ self.W_enc + self.b_gate
        pi_mag = x_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return pi_gate, pi_mag

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pi_gate, pi_mag = self._paths(x)
        return (pi_gate > 0).to(pi_mag.dtype) * pi_mag.relu()

    def training_forward(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        dead_mask: torch.Tensor | None,
        sparsity_multiplier: float = 1.0,
    ) -> TrainOutput:
        pi_gate, pi_mag = self._paths(x)
        z = (pi_gate > 0).to(pi_mag.dtype) * pi_mag.relu()
        x_hat = self.reconstruct(x, z)
        mse = squared_error(target, x_hat)
        gate = pi_gate.relu()
        l1 = self.sum_over_latents((gate * self.decoder_norms()).sum(-1)).mean()
        aux_hat = self.sum_over_latents(gate @ self.W_dec.detach()) + self.b_dec.detach()
        if self.W_skip is not None:
            aux_hat = aux_hat + x @ self.W_skip.detach().T
        aux = squared_error(target, aux_hat)
        loss = mse + sparsity_multiplier * self.sparsity_coefficient * l1 + aux
        terms = {"mse": mse.detach(), "l1": l1.detach(), "aux": aux.detach()}
        return TrainOutput(loss, x_hat, z, terms)

    @torch.no_grad()
    def scale_latents_(self, factors: torch.Tensor) -> bool:
        """The gate's sign is kept (W_enc and b_gate scaled together); the magnitude, which
        reads W_enc·exp(r_mag), scales with W_enc and b_mag."""
        self.W_enc *= factors
        self.b_gate *= factors
        self.b_mag *= factors
        self.W_dec /= factors[:, None]
        return True

    @torch.no_grad()
    def absorb_input_shift(self, delta: torch.Tensor) -> None:
        shift = delta @ self.W_enc
        self.b_gate += shift
        self.b_mag += shift * self.r_mag.exp()

    @torch.no_grad()
    def shift_sparsity(self, amount: float) -> None:
        """Both paths' biases lowered by `amount` of their latent's pre-activation scale
        (‖W_enc,i‖ for the gate, × exp(r_mag,i) for the magnitude): z_i ≠ 0 needs both > 0."""
        step = amount * self.encoder_norms().to(self.b_gate.dtype)
        self.b_gate -= step
        self.b_mag -= step * self.r_mag.exp()

    def saelens_architecture(self) -> str:
        return "gated_skip_transcoder" if self.W_skip is not None else "gated"

    @classmethod
    def init_kwargs_from_config(cls, cfg: DictionaryConfig) -> dict[str, Any]:
        return {"sparsity_coefficient": cfg.sparsity_coefficient, "target_l0": cfg.target_l0}
