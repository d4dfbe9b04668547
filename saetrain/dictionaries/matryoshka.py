"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders").

The latents are ordered, and every prefix of the dictionary (the first m_1 < m_2 < … < n latents)
must reconstruct the input on its own. The prefix losses are combined by
`dictionary.matryoshka_reduction`:
- "mean" (the authors' code, Bussmann et al.): loss = mean_m FVU(y, z[:, :m]·W_dec[:m] + b_dec)
  + AuxK, so the reconstruction's scale — and AuxK's weight against it — does not depend on the
  number of prefixes;
- "sum" (SAELens): Σ_m FVU_m + AuxK, which weighs reconstruction M times more (M prefixes).
Early latents learn general features, later ones refinements, instead of absorbing each other.
Codes are chosen by BatchTopK over all latents; inference and export are BatchTopK's (a JumpReLU
with the running threshold).
"""

from __future__ import annotations

from typing import Any

import torch

from saetrain.config import DictionaryConfig
from saetrain.dictionaries.base import Codes, SparseCodes
from saetrain.dictionaries.batchtopk import BatchTopKSAE
from saetrain.errors import ConfigError
from saetrain.kernels.ops import sparse_decode

MATRYOSHKA_REDUCTIONS = ("mean", "sum")


def default_prefixes(n_latents: int, levels: int = 5) -> list[int]:
    """n/16, n/8, n/4, n/2, n (fewer levels for tiny dictionaries)."""
    sizes = sorted({max(n_latents >> i, 1) for i in range(levels)})
    return sizes


class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka"
    # Not split over ranks: its prefix losses decode ranges of latents, not made whole over shards.
    shards_latents = False
    # Not TopK's 0.5: FVU 0.1186 at 1 and 0.1180 at 0.5, but never-fired latents 1.3% → 3.9%
    # (docs/topk_ablation.md).
    encoder_init_norm = 1.0

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        d_out: int | None = None,
        prefixes: list[int] | None = None,
        reduction: str = "sum",
        **kwargs: Any,
    ):
        super().__init__(d_in, n_latents, d_out, **kwargs)
        if reduction not in MATRYOSHKA_REDUCTIONS:
            raise ConfigError(
                f"dictionary.matryoshka_reduction={reduction!r}; choose one of: "
                f"{', '.join(MATRYOSHKA_REDUCTIONS)}"
            )
        self.reduction = reduction
        prefixes = sorted(set(prefixes)) if prefixes else default_prefixes(n_latents)
        if prefixes[-1] != n_latents or prefixes[0] < 1:
            raise ConfigError(
                f"dictionary.matryoshka_prefixes={prefixes} must be increasing sizes in "
                f"1..{n_latents} ending with n_latents={n_latents}"
            )
        self.prefixes = prefixes

    def reconstruction_loss(
        self, x: torch.Tensor, target: torch.Tensor, z: Codes, total_variance: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        partial = self.b_dec.expand(x.shape[0], -1)
        if self.W_skip is not None:
            partial = partial + x @ self.W_skip.T
        loss = partial.new_zeros(())
        start = 0
        for end in self.prefixes:
            partial = partial + self._decode_range(z, start, end)
            fvu = (target - partial).pow(2).sum() / total_variance
            loss = loss + fvu
            start = end
        total = loss / len(self.prefixes) if self.reduction == "mean" else loss
        return total, partial, {"fvu": fvu.detach(), "fvu_sum_prefixes": loss.detach()}

    def _decode_range(self, z: Codes, start: int, end: int) -> torch.Tensor:
        """The latents start..end-1's part of the decoder output (sparse codes stay sparse: the
        other entries' values are masked to 0, so each level costs one O(N·kmax·d) decode)."""
        if isinstance(z, SparseCodes):
            in_range = (z.indices >= start) & (z.indices < end)
            return sparse_decode(z.indices, z.values * in_range, self.W_dec)
        return z[:, start:end] @ self.W_dec[start:end]

    @classmethod
    def init_kwargs_from_config(cls, cfg: DictionaryConfig) -> dict[str, Any]:
        return super().init_kwargs_from_config(cfg) | {
            "prefixes": list(cfg.matryoshka_prefixes or []),
            "reduction": cfg.matryoshka_reduction,
        }
