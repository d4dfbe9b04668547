"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

z = ReLU(TopK((x − b_dec)·W_enc + b_enc)); x̂ = z·W_dec + b_dec. Sparsity is set by k, not by a
penalty. AuxK: the top `aux_k` pre-activations among dead latents reconstruct the main model's
residual, so dead latents receive gradient and come back.
"""

from __future__ import annotations

from typing import Any

import torch

from saetrain.dictionaries.base import Dictionary, SparseCodes, TrainOutput
from saetrain.kernels.reference import sparse_decode


class TopKSAE(Dictionary):
    architecture = "topk"

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        d_out: int | None = None,
        k: int = 32,
        aux_k: int | None = None,
        aux_k_coefficient: float = 1 / 32,
        **kwargs: Any,
    ):
        super().__init__(d_in, n_latents, d_out, **kwargs)
        self.k = k
        self.aux_k = aux_k if aux_k is not None else d_in // 2
        self.aux_k_coefficient = aux_k_coefficient

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> SparseCodes:
        return self._select(self.pre_activations(x))

    def _select(self, pre: torch.Tensor) -> SparseCodes:
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return SparseCodes(indices, values.relu())

    def training_forward(
        self, x: torch.Tensor, target: torch.Tensor, dead_mask: torch.Tensor | None
    ) -> TrainOutput:
        pre = self.pre_activations(x)
        codes = self._select(pre)
        x_hat = self.decode(codes)
        residual = target - x_hat
        total_variance = (target - target.mean(0)).pow(2).sum().clamp_min(1e-12)
        fvu = residual.pow(2).sum() / total_variance
        loss = fvu
        terms = {"fvu": fvu.detach()}
        if dead_mask is not None and self.aux_k_coefficient > 0:
            n_dead = int(dead_mask.sum())
            if n_dead > 0:
                aux_k = min(self.aux_k, n_dead)
                dead_pre = pre.masked_fill(~dead_mask, float("-inf"))
                values, indices = dead_pre.topk(aux_k, dim=-1, sorted=False)
                e_hat = sparse_decode(indices, values.relu(), self.W_dec)
                # Fewer dead latents than aux_k: weaken the term in proportion (as in the paper's
                # reference code), so a handful of dead latents cannot dominate.
                scale = min(n_dead / self.aux_k, 1.0)
                aux = scale * (e_hat - residual.detach()).pow(2).sum() / total_variance
                loss = loss + self.aux_k_coefficient * aux
                terms["auxk"] = aux.detach()
        return TrainOutput(loss=loss, x_hat=x_hat, codes=codes, terms=terms)

    def saelens_fields(self) -> dict[str, Any]:
        return {"k": self.k}

    @classmethod
    def from_saelens_fields(cls, d_in: int, n_latents: int, d_out: int, cfg: dict[str, Any]):
        return cls(d_in, n_latents, d_out, k=int(cfg["k"]))
