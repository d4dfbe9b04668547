"""Data-dependent starting points: the normalisation scale and b_dec."""

from __future__ import annotations

import torch


def normalization_scale(samples: torch.Tensor) -> float:
    """The factor s with E‖s·x‖² = d, so hyper-parameters transfer across models and sites."""
    mean_sq_norm = samples.double().pow(2).sum(-1).mean()
    return float((samples.shape[-1] / mean_sq_norm).sqrt())


def block_normalization_scales(
    samples: torch.Tensor, widths: tuple[int, ...]
) -> float | torch.Tensor:
    """One site: its scale. Several side by side (a crosscoder's or CLT's): each site's own
    scale, repeated over its columns ([Σ widths]), so every site enters with E‖s·x‖² = width."""
    if len(widths) == 1:
        return normalization_scale(samples)
    parts, start = [], 0
    for width in widths:
        scale = normalization_scale(samples[:, start : start + width])
        parts.append(torch.full((width,), scale, dtype=torch.float32))
        start += width
    return torch.cat(parts)


def scale_summary(scale: float | torch.Tensor) -> float | list[float]:
    """A scale for JSON and logs: the number, or each site's (one per block of equal values)."""
    if not isinstance(scale, torch.Tensor):
        return float(scale)
    values = scale.detach().cpu().tolist()
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


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
