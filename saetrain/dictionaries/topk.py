"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

z = ReLU(TopK((x − b_dec)·W_enc + b_enc)); x̂ = z·W_dec + b_dec. Sparsity is set by k, not by a
penalty. AuxK: the top `aux_k` pre-activations among dead latents reconstruct the main model's
residual, so dead latents receive gradient and come back.
"""

from __future__ import annotations

from typing import Any

import torch

from saetrain.config import DictionaryConfig
from saetrain.dictionaries.base import Dictionary, SparseCodes, TrainOutput, fvu_loss
from saetrain.kernels.reference import sparse_decode


def auxk_loss(
    dictionary: Dictionary,
    pre: torch.Tensor,
    residual: torch.Tensor,
    total_variance: torch.Tensor,
    dead_mask: torch.Tensor | None,
    aux_k: int,
) -> torch.Tensor | None:
    """AuxK (Gao et al.): dead latents' top pre-activations model the (detached) residual.

    Normalised like the main FVU loss. With fewer dead latents than aux_k the term is weakened in
    proportion, so a handful of dead latents cannot dominate. None when no latent is dead.
    """
    if dead_mask is None:
        return None
    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return None
    k = min(aux_k, n_dead)
    values, indices = pre.masked_fill(~dead_mask, float("-inf")).topk(k, dim=-1, sorted=False)
    e_hat = sparse_decode(indices, values.relu(), dictionary.W_dec)
    scale = min(n_dead / aux_k, 1.0)
    return scale * (e_hat - residual.detach()).pow(2).sum() / total_variance


class TopKSAE(Dictionary):
    architecture = "topk"
    transcoder_encoder_scale = 0.1  # k latents always fire

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

    def encode(self, x: torch.Tensor) -> SparseCodes:
        return self._select(self.pre_activations(x))

    def _select(self, pre: torch.Tensor) -> SparseCodes:
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return SparseCodes(indices, values.relu())

    def training_forward(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        dead_mask: torch.Tensor | None,
        sparsity_multiplier: float = 1.0,
    ) -> TrainOutput:
        pre = self.pre_activations(x)
        codes = self._select(pre)
        x_hat = self.reconstruct(x, codes)
        fvu, total_variance = fvu_loss(target, x_hat)
        loss, terms = fvu, {"fvu": fvu.detach()}
        if self.aux_k_coefficient > 0:
            aux = auxk_loss(self, pre, target - x_hat, total_variance, dead_mask, self.aux_k)
            if aux is not None:
                loss = loss + self.aux_k_coefficient * aux
                terms["auxk"] = aux.detach()
        return TrainOutput(loss=loss, x_hat=x_hat, codes=codes, terms=terms)

    def saelens_architecture(self) -> str:
        # SAELens's TopKSAE computes a transcoder too when d_in == d_out and
        # apply_b_dec_to_input is false; a skip connection has no SAELens class.
        return "topk_skip_transcoder" if self.W_skip is not None else "topk"

    def saelens_fields(self) -> dict[str, Any]:
        return {"k": self.k}

    @classmethod
    def init_kwargs_from_saelens(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {"k": int(cfg["k"])}

    @classmethod
    def init_kwargs_from_config(cls, cfg: DictionaryConfig) -> dict[str, Any]:
        return {"k": cfg.k, "aux_k": cfg.aux_k, "aux_k_coefficient": cfg.aux_k_coefficient}
