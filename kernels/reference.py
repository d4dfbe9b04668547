"""Torch reference implementations of the sparse dictionary ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """x̂[i] = Σ_j values[i, j] · W_dec[indices[i, j]]  (no bias).

    indices, values: [N, k]; W_dec: [n_latents, d]. Costs O(N·k·d) rather than the O(N·n·d) of a
    dense product with the scattered codes; differentiable in `values` and `W_dec`.
    """
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")
