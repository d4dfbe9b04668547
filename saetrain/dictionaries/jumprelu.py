"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope).

z = pre·H(pre − θ) with a learnt per-latent threshold θ = exp(log θ) > 0; loss = Σ‖y − ŷ‖²/N +
λ·Σ_i H(pre_i − θ_i)/N (an L0 penalty, λ warmed up from 0). H has no useful gradient, so θ
learns through straight-through estimators that replace the derivative of the step by a
rectangle kernel of width ε (the bandwidth):
    ∂JumpReLU/∂θ = −(θ/ε)·K((pre − θ)/ε),   ∂H/∂θ = −(1/ε)·K((pre − θ)/ε),   K(u) = 1[|u| < ½],
and the gradient to pre is that of pre·1[pre > θ] (none through the step). θ is kept in fp32
whatever the weights' dtype. Exported as SAELens's "jumprelu" with `threshold` = θ.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from saetrain.config import DictionaryConfig
from saetrain.dictionaries.base import Dictionary, TrainOutput, squared_error


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

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        d_out: int | None = None,
        sparsity_coefficient: float = 1.0,
        bandwidth: float = 0.001,
        init_threshold: float = 0.001,
        **kwargs: Any,
    ):
        super().__init__(d_in, n_latents, d_out, **kwargs)
        self.sparsity_coefficient = sparsity_coefficient
        self.bandwidth = bandwidth
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
        x_hat = self.reconstruct(x, z)
        mse = squared_error(target, x_hat)
        l0 = StepFunction.apply(pre, theta, self.bandwidth).sum(-1).mean()
        loss = mse + sparsity_multiplier * self.sparsity_coefficient * l0
        return TrainOutput(loss, x_hat, z, {"mse": mse.detach(), "l0_penalty": l0.detach()})

    def _apply(self, fn: Any, recurse: bool = True) -> JumpReLUSAE:
        """Move or cast like any module, but keep the threshold in fp32 (never rounded)."""
        kept = self.log_threshold.data
        super()._apply(fn, recurse)
        self.log_threshold.data = kept.to(self.W_enc.device)
        return self

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
        }
