"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

z = ReLU(TopK((x − b_dec)·W_enc + b_enc)); x̂ = z·W_dec + b_dec. Sparsity is set by k, not by a
penalty. AuxK: the top `aux_k` pre-activations among dead latents reconstruct the main model's
residual, so dead latents receive gradient and come back.

AuxK's normalisation (`dictionary.aux_k_normalization`):
- "residual" (Gao et al.'s paper and openai/sparse_autoencoder): the term is a normalised MSE
  against the residual e = y − ŷ it reconstructs, Σ‖ê − e‖² / Σ‖e − mean(e)‖². It does not
  weaken as the main reconstruction improves.
- "target" (sparsify): Σ‖ê − e‖² / Σ‖y − mean(y)‖², the main FVU's denominator; as the FVU falls
  this term shrinks with it (by the FVU: 3–10× weaker at FVU 0.1–0.3).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from saetrain.config import DictionaryConfig
from saetrain.dictionaries.base import (
    Dictionary,
    LatentSplit,
    SparseCodes,
    TrainOutput,
    total_variance,
)
from saetrain.kernels.ops import encode_gather, fused_topk_encode, sparse_decode, use_fused_topk

AUX_K_NORMALIZATIONS = ("residual", "target")


class AuxSelection(NamedTuple):
    """The dead latents AuxK uses: their indices [N, k_aux], the term's weight, and under latent
    sharding the mask of this shard's slots (None: every slot is this dictionary's)."""

    indices: torch.Tensor
    scale: float
    mask: torch.Tensor | None = None


def select_dead(
    pre: torch.Tensor, dead_mask: torch.Tensor | None, aux_k: int, split: LatentSplit | None = None
) -> AuxSelection | None:
    """The top `aux_k` pre-activations among dead latents (None when no latent is dead).

    With fewer dead latents than aux_k the term is weakened in proportion, so a handful of dead
    latents cannot dominate. Split over ranks (`split`), the dead are counted over every shard
    and each shard's top candidates are merged: the one-process selection.
    """
    if dead_mask is None:
        return None
    n_dead = int(dead_mask.sum()) if split is None else int(split.total(dead_mask.sum()))
    if n_dead == 0:
        return None
    k = min(aux_k, n_dead)
    masked = pre.masked_fill(~dead_mask, float("-inf"))
    if split is None:
        return AuxSelection(masked.topk(k, dim=-1, sorted=False).indices, min(n_dead / aux_k, 1.0))
    local, mine = split.keep_mine(row_candidates(masked, k, split))
    return AuxSelection(local, min(n_dead / aux_k, 1.0), mine)


def row_candidates(pre: torch.Tensor, k: int, split: LatentSplit) -> torch.Tensor:
    """Global indices [N, k] of each row's k largest pre-activations over every shard: this
    shard's top candidates merged with the others' (a global winner is in its shard's list)."""
    values, index = pre.topk(min(k, split.n_local), dim=1, sorted=False)
    return split.merge_top(values, index + split.start, k)[1]


def auxk_loss(
    dictionary: Dictionary,
    aux: AuxSelection,
    values: torch.Tensor,
    residual: torch.Tensor,
    total_variance: torch.Tensor,
    normalization: str = "residual",
) -> torch.Tensor:
    """AuxK (Gao et al.): dead latents' top pre-activations model the (detached) residual.

    `values` are the ReLU'd pre-activations at aux.indices, gathered with a sparse backward like
    the main codes. Divided by the residual's own variance ("residual", Gao et al.) or by the
    target's ("target", sparsify); see the module docstring.
    """
    e = residual.detach()
    if aux.mask is not None:  # another shard's slots
        values = values * aux.mask
    e_hat = dictionary.sum_over_latents(sparse_decode(aux.indices, values, dictionary.W_dec))
    if normalization == "residual":
        denominator = (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)
    else:
        denominator = total_variance
    return aux.scale * (e_hat - e).pow(2).sum() / denominator


def gather_codes(
    dictionary: Dictionary,
    x_in: torch.Tensor,
    pre: torch.Tensor,
    indices: torch.Tensor,
    aux: AuxSelection | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ReLU'd pre at indices, ReLU'd pre at the AuxK indices or None) in one sparse gather.

    One gather (and one backward: one sort, one segmented reduction) for the kept and the AuxK
    entries together: the encoder gradient is non-zero only there.
    """
    both = indices if aux is None else torch.cat([indices, aux.indices], dim=1)
    gathered = encode_gather(x_in, dictionary.W_enc, dictionary.b_enc, both, pre).relu()
    k = indices.shape[1]
    return gathered[:, :k], (None if aux is None else gathered[:, k:])


class TopKSAE(Dictionary):
    architecture = "topk"
    selects_k = True
    latent_sharding = "selection"
    # Measured (docs/topk_ablation.md, SmolLM2 resid_post.6, 4608 latents, k 32, 205k tokens):
    # held-out FVU 0.1194 at 1, 0.1095 at 0.5, 0.1104 at 0.25; BatchTopK 0.1153 → 0.1101.
    encoder_init_norm = 0.5
    transcoder_encoder_scale = 0.1  # k latents always fire

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        d_out: int | None = None,
        k: int = 32,
        aux_k: int | None = None,
        aux_k_coefficient: float = 1 / 32,
        aux_k_normalization: str = "residual",
        **kwargs: Any,
    ):
        super().__init__(d_in, n_latents, d_out, **kwargs)
        if aux_k_normalization not in AUX_K_NORMALIZATIONS:
            raise ValueError(
                f"dictionary.aux_k_normalization={aux_k_normalization!r}; choose one of: "
                f"{', '.join(AUX_K_NORMALIZATIONS)}"
            )
        self.k = k
        self.aux_k = aux_k if aux_k is not None else d_in // 2
        self.aux_k_coefficient = aux_k_coefficient
        self.aux_k_normalization = aux_k_normalization

    def encode(self, x: torch.Tensor) -> SparseCodes:
        """Without autograd and where the Triton kernel runs, the fused encoder/top-k (the [N, n]
        pre-activations are never written); otherwise the dense pre-activations and topk."""
        if not torch.is_grad_enabled() and use_fused_topk(x, self.W_enc, self.k):
            b_dec = self.b_dec if self.apply_b_dec_to_input else None
            values, indices = fused_topk_encode(x, self.W_enc, self.b_enc, self.k, b_dec)
            return SparseCodes(indices, values.relu())
        return self._select(self.pre_activations(x))

    def _select(self, pre: torch.Tensor) -> SparseCodes:
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return SparseCodes(indices, values.relu())

    def training_selection(
        self, pre: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """(indices [N, k'], mask of real slots or None, extra logged terms) of the latents a
        training step keeps: the row's top k here (over every shard when the latents are split:
        this shard's winners); BatchTopK selects across the batch."""
        if self.latent_split is None:
            return pre.topk(self.k, dim=-1, sorted=False).indices, None, {}
        indices, mine = self.latent_split.keep_mine(row_candidates(pre, self.k, self.latent_split))
        return indices, mine, {}

    def reconstruction_loss(
        self, x: torch.Tensor, target: torch.Tensor, z: SparseCodes, variance: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, ŷ, logged terms): the batch FVU here; Matryoshka sums it over prefixes."""
        x_hat = self.reconstruct(x, z)
        fvu = (target - x_hat).pow(2).sum() / variance
        return fvu, x_hat, {"fvu": fvu.detach()}

    def training_forward(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        dead_mask: torch.Tensor | None,
        sparsity_multiplier: float = 1.0,
    ) -> TrainOutput:
        x_in = self.encoder_input(x)
        with torch.no_grad():  # the one dense product; its backward is sparse (encode_gather)
            pre = x_in @ self.W_enc + self.b_enc
            indices, mask, extra = self.training_selection(pre)
            aux = (
                select_dead(pre, dead_mask, self.aux_k, self.latent_split)
                if self.aux_k_coefficient > 0
                else None
            )
        values, aux_values = gather_codes(self, x_in, pre, indices, aux)
        codes = SparseCodes(indices, values if mask is None else values * mask)
        variance = total_variance(target)
        loss, x_hat, terms = self.reconstruction_loss(x, target, codes, variance)
        if aux is not None:
            aux_term = auxk_loss(
                self, aux, aux_values, target - x_hat, variance, self.aux_k_normalization
            )
            loss = loss + self.aux_k_coefficient * aux_term
            terms["auxk"] = aux_term.detach()
        return TrainOutput(loss=loss, x_hat=x_hat, codes=codes, terms=terms | extra)

    def saelens_architecture(self) -> str:
        # SAELens's TopKSAE computes a transcoder too when d_in == d_out and
        # apply_b_dec_to_input is false; a skip connection has no SAELens class.
        return "topk_skip_transcoder" if self.W_skip is not None else "topk"

    def saelens_fields(self) -> dict[str, Any]:
        return {"k": self.k}

    @classmethod
    def init_kwargs_from_saelens(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {"k": int(cfg["k"])}

    def config_fields(self) -> dict[str, Any]:
        return super().config_fields() | {"k": self.k}

    @torch.no_grad()
    def scale_latents_(self, factors: torch.Tensor) -> bool:
        """Only one factor for all latents (to float rounding): unequal ones would change which
        k are kept."""
        common = torch.full_like(factors, float(factors[0]))
        if not torch.allclose(factors, common, rtol=1e-5, atol=0.0):
            return False
        return super().scale_latents_(common)

    @classmethod
    def init_kwargs_from_config(cls, cfg: DictionaryConfig) -> dict[str, Any]:
        return {
            "k": cfg.k,
            "aux_k": cfg.aux_k,
            "aux_k_coefficient": cfg.aux_k_coefficient,
            "aux_k_normalization": cfg.aux_k_normalization,
        }
