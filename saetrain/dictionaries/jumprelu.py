"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope; Anthropic's 2025 recipe).

z = pre·H(pre − θ) with a learnt per-latent threshold θ = exp(log θ) > 0, and
loss = Σ‖y − ŷ‖²/N + λ·S + λ_P·P, λ warmed up from 0 (and adapted towards `target_l0` when one is
given; see saetrain/training/l0_controller.py). The sparsity penalty S (`sparsity_loss`), per row
and averaged over the batch's N rows:
- "step" (Rajamanoharan et al., Gemma Scope): S = Σ_i H(pre_i − θ_i), the L0 itself;
- "quadratic" (around a target L0*, after Gemma Scope 2): S = (L0 − L0*)² / L0* with L0 the
  batch's mean step count, which pulls L0 towards L0* from either side. The Gemma Scope 2 report
  describes a penalty quadratic around a target; its exact normalisation could not be confirmed,
  and this one is ours (it equals L0* at L0 = 2·L0*, the step penalty's size there);
- "tanh" (Anthropic, Circuits Updates January 2025): S = Σ_i tanh(c·z_i·‖W_dec,i‖), a smooth
  count that also reaches the encoder through z.
The pre-activation loss (Anthropic, same update), P = Σ_i ReLU(θ_i − pre_i)·‖W_dec,i‖ (on all
latents, as Anthropic; or on dead latents only, as SAELens), pulls latents that never fire up to
their threshold, so they do not stay dead. Off when λ_P = 0.

H has no useful gradient, so θ learns through straight-through estimators that replace the
derivative of the step by a rectangle kernel of width ε (the bandwidth):
    ∂JumpReLU/∂θ = −(θ/ε)·K((pre − θ)/ε),   ∂H/∂θ = −(1/ε)·K((pre − θ)/ε),   K(u) = 1[|u| < ½],
and the gradient to pre is that of pre·1[pre > θ] (none through the step). θ is kept in fp32
whatever the weights' dtype.

Units: θ, ε and the codes live in the units of the training pre-activations, computed on
activations scaled to E‖x‖² = d_in (per-dimension RMS 1; a unit-norm latent direction fully
present in x has a code of order 1). The export folds the scale into W_enc and W_dec (base.py), so
the exported encoder's pre-activations on raw activations equal the training ones, and the
exported `threshold` is θ in those same units: a code z_i of the exported SAE contributes
z_i·‖W_dec,i‖ to the raw activation, with ‖W_dec,i‖ = 1/s (s the normalisation scale, in
saetrain_run.json). Exported as SAELens's "jumprelu" with `threshold` = θ.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from saetrain.config import DictionaryConfig
from saetrain.dictionaries.base import Codes, Dictionary, TrainOutput, squared_error

SPARSITY_LOSSES = ("step", "quadratic", "tanh")
PRE_ACT_LATENTS = ("all", "dead")


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """pre·1[pre > θ], with the straight-through gradient for θ."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        # Compare in fp32 (type promotion): rounding θ to a bf16 `pre` would move the jump.
        grad_pre = grad * (pre > threshold).to(grad.dtype)
        kernel = _rectangle((pre - threshold) / eps)
        grad_threshold = -(threshold / eps) * kernel * grad
        return grad_pre, grad_threshold.sum(0).to(threshold.dtype), None


class StepFunction(torch.autograd.Function):
    """1[pre > θ], with the straight-through gradient for θ (none for pre)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = _rectangle((pre - threshold) / eps)
        grad_threshold = -(1.0 / eps) * kernel * grad
        return None, grad_threshold.sum(0).to(threshold.dtype), None


def jumprelu_saelens_name(dictionary: Dictionary) -> str:
    """SAELens's name for a JumpReLU dictionary of this kind (SAE, transcoder, skip transcoder)."""
    if not dictionary.transcoder:
        return "jumprelu"
    return "jumprelu_skip_transcoder" if dictionary.W_skip is not None else "jumprelu_transcoder"


class JumpReLUSAE(Dictionary):
    architecture = "jumprelu"
    shards_latents = True  # elementwise: its sums over latents go through sum_over_latents

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        d_out: int | None = None,
        sparsity_coefficient: float = 1.0,
        bandwidth: float = 0.001,
        init_threshold: float = 0.001,
        sparsity_loss: str = "step",
        tanh_scale: float = 4.0,
        pre_act_coefficient: float = 0.0,
        pre_act_latents: str = "all",
        target_l0: float | None = None,
        **kwargs: Any,
    ):
        super().__init__(d_in, n_latents, d_out, **kwargs)
        for name, value, choices in (
            ("jumprelu_sparsity_loss", sparsity_loss, SPARSITY_LOSSES),
            ("jumprelu_pre_act_latents", pre_act_latents, PRE_ACT_LATENTS),
        ):
            if value not in choices:
                raise ValueError(
                    f"dictionary.{name}={value!r}; choose one of: {', '.join(choices)}"
                )
        if sparsity_loss == "quadratic" and target_l0 is None:
            raise ValueError(
                "dictionary.jumprelu_sparsity_loss='quadratic' is quadratic around a target: "
                "set dictionary.target_l0"
            )
        self.sparsity_coefficient = sparsity_coefficient
        self.bandwidth = bandwidth
        self.sparsity_loss = sparsity_loss
        self.tanh_scale = tanh_scale
        self.pre_act_coefficient = pre_act_coefficient
        self.pre_act_latents = pre_act_latents
        self.target_l0 = target_l0
        device = self.W_enc.device
        self.log_threshold = nn.Parameter(
            torch.full((n_latents,), math.log(init_threshold), dtype=torch.float32, device=device)
        )

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        return pre * (pre > self.threshold).to(pre.dtype)

    def sparsity_penalty(
        self, pre: torch.Tensor, z: torch.Tensor, theta: torch.Tensor
    ) -> torch.Tensor:
        """S of the module docstring, before λ: a per-row mean over the batch."""
        if self.sparsity_loss == "tanh":
            scaled = self.tanh_scale * z * self.decoder_norms()
            return self.sum_over_latents(torch.tanh(scaled).sum(-1)).mean()
        steps = StepFunction.apply(pre, theta, self.bandwidth).sum(-1)
        l0 = self.sum_over_latents(steps).mean()
        if self.sparsity_loss == "quadratic":
            target = float(self.target_l0)
            return (l0 - target).pow(2) / target
        return l0

    def pre_act_loss(
        self, pre: torch.Tensor, theta: torch.Tensor, dead_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """P of the module docstring: how far below its threshold each latent sits."""
        below = (theta - pre).relu() * self.decoder_norms()
        if self.pre_act_latents == "dead":
            if dead_mask is None:
                return below.new_zeros(())
            below = below * dead_mask.to(below.dtype)
        return self.sum_over_latents(below.sum(-1)).mean()

    def training_codes(self, z: torch.Tensor, pre: torch.Tensor, theta: torch.Tensor) -> Codes:
        """What the training step's decoder reads: the dense codes here (a CLT decodes sparsely
        and keeps the threshold's straight-through window in its support)."""
        return z

    def training_forward(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        dead_mask: torch.Tensor | None,
        sparsity_multiplier: float = 1.0,
    ) -> TrainOutput:
        pre = self.pre_activations(x)
        theta = self.threshold
        z = JumpReLUFunction.apply(pre, theta, self.bandwidth)
        x_hat = self.reconstruct(x, self.training_codes(z, pre, theta))
        mse = squared_error(target, x_hat)
        penalty = self.sparsity_penalty(pre, z, theta)
        loss = mse + sparsity_multiplier * self.sparsity_coefficient * penalty
        terms = {"mse": mse.detach(), "l0_penalty": penalty.detach()}
        if self.pre_act_coefficient > 0:
            pre_act = self.pre_act_loss(pre, theta, dead_mask)
            loss = loss + self.pre_act_coefficient * pre_act
            terms["pre_act"] = pre_act.detach()
        return TrainOutput(loss, x_hat, z, terms)

    @torch.no_grad()
    def shift_sparsity(self, amount: float) -> None:
        """θ ← θ·e^amount (every latent's, in log space: θ stays > 0)."""
        self.log_threshold += amount

    def _apply(self, fn: Any, recurse: bool = True) -> JumpReLUSAE:
        """Move or cast like any module, but keep the threshold in fp32 (never rounded)."""
        kept = self.log_threshold.data
        super()._apply(fn, recurse)
        self.log_threshold.data = kept.to(self.W_enc.device)
        return self

    @torch.no_grad()
    def scale_latents_(self, factors: torch.Tensor) -> bool:
        """The thresholds scale with the pre-activations."""
        self.log_threshold += factors.float().log()
        return super().scale_latents_(factors)

    def saelens_architecture(self) -> str:
        return jumprelu_saelens_name(self)

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().saelens_tensors()
        tensors["threshold"] = self.threshold.detach().to(self.W_enc.dtype)
        del tensors["log_threshold"]
        return tensors

    def load_saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        threshold = tensors.pop("threshold").float().clamp_min(1e-30)
        tensors["log_threshold"] = threshold.log()
        self.load_state_dict(tensors)

    @classmethod
    def init_kwargs_from_config(cls, cfg: DictionaryConfig) -> dict[str, Any]:
        return {
            "sparsity_coefficient": cfg.sparsity_coefficient,
            "bandwidth": cfg.jumprelu_bandwidth,
            "init_threshold": cfg.jumprelu_init_threshold,
            "sparsity_loss": cfg.jumprelu_sparsity_loss,
            "tanh_scale": cfg.jumprelu_tanh_scale,
            "pre_act_coefficient": cfg.jumprelu_pre_act_coefficient,
            "pre_act_latents": cfg.jumprelu_pre_act_latents,
            "target_l0": cfg.target_l0,
        }
