"""Data-dependent starting points: the normalisation scale and b_dec."""

from __future__ import annotations

import torch


def normalization_scale(samples: torch.Tensor) -> float:
    """The factor s with E‖s·x‖² = d, so hyper-parameters transfer across models and sites."""
    mean_sq_norm = samples.double().pow(2).sum(-1).mean()
    return float((samples.shape[-1] / mean_sq_norm).sqrt())


def geometric_median(points: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """The point minimising the sum of Euclidean distances (Weiszfeld's algorithm).

    A robust centre for b_dec: unlike the mean it is not dragged by the heavy-norm outliers that
    residual streams have.
    """
    pts = points.double()
    guess = pts.mean(0)
    for _ in range(iters):
        dist = (pts - guess).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / dist
        new = (weights[:, None] * pts).sum(0) / weights.sum()
        if (new - guess).norm() <= tol * guess.norm().clamp_min(1e-12):
            guess = new
            break
        guess = new
    return guess.to(points.dtype)


def initial_b_dec(samples: torch.Tensor, method: str) -> torch.Tensor:
    if method == "geometric_median":
        return geometric_median(samples)
    if method == "mean":
        return samples.mean(0)
    if method == "zeros":
        return torch.zeros(samples.shape[-1], dtype=samples.dtype, device=samples.device)
    raise ValueError(f"dictionary.b_dec_init={method!r}; choose geometric_median, mean or zeros")
