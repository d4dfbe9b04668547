"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders").

The latents are ordered, and every prefix of the dictionary (the first m_1 < m_2 < … < n latents)
must reconstruct the input on its own: loss = Σ_m FVU(y, z[:, :m]·W_dec[:m] + b_dec) + AuxK.
Early latents learn general features, later ones refinements, instead of absorbing each other.
Codes are chosen by BatchTopK over all latents; inference and export are BatchTopK's (a JumpReLU
with the running threshold).
"""

from __future__ import annotations

from typing import Any

import torch

from saetrain.config import ConfigError, DictionaryConfig
from saetrain.dictionaries.batchtopk import BatchTopKSAE


def default_prefixes(n_latents: int, levels: int = 5) -> list[int]:
    """n/16, n/8, n/4, n/2, n (fewer levels for tiny dictionaries)."""
    sizes = sorted({max(n_latents >> i, 1) for i in range(levels)})
    return sizes


class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka"

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        d_out: int | None = None,
        prefixes: list[int] | None = None,
        **kwargs: Any,
    ):
        super().__init__(d_in, n_latents, d_out, **kwargs)
        prefixes = sorted(set(prefixes)) if prefixes else default_prefixes(n_latents)
        if prefixes[-1] != n_latents or prefixes[0] < 1:
            raise ConfigError(
                f"dictionary.matryoshka_prefixes={prefixes} must be increasing sizes in "
                f"1..{n_latents} ending with n_latents={n_latents}"
            )
        self.prefixes = prefixes

    def reconstruction_loss(
        self, x: torch.Tensor, target: torch.Tensor, z: torch.Tensor, total_variance: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        partial = self.b_dec.expand(z.shape[0], -1)
        if self.W_skip is not None:
            partial = partial + x @ self.W_skip.T
        loss = z.new_zeros(())
        start = 0
        for end in self.prefixes:
            partial = partial + z[:, start:end] @ self.W_dec[start:end]
            fvu = (target - partial).pow(2).sum() / total_variance
            loss = loss + fvu
            start = end
        return loss, partial, {"fvu": fvu.detach(), "fvu_sum_prefixes": loss.detach()}

    @classmethod
    def init_kwargs_from_config(cls, cfg: DictionaryConfig) -> dict[str, Any]:
        return super().init_kwargs_from_config(cfg) | {
            "prefixes": list(cfg.matryoshka_prefixes or [])
        }
