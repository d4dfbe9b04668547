"""Crosscoders (Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and Model
Diffing"): one latent code read from S sources and decoded to all S.

With the S sources side by side in a row, a crosscoder is a dictionary over the concatenation:
W_enc [S·d, n] is the stack of the per-source encoders (pre = Σ_s x_s·W_enc^s + b_enc), W_dec
[n, S·d] the per-source decoders. So every architecture's activation and loss apply as they are;
what is the crosscoder's own:
- each source is normalised by its own scale (the trainer's per-column scales);
- the decoder norm that weights a latent's sparsity penalty (ReLU's L1, JumpReLU's tanh and
  pre-activation losses) is Σ_s ‖W_dec^s‖, the sum over sources, as in the paper, so a latent
  pays for every source it writes to;
- exported with W_enc [S, d, n], b_enc [n], W_dec [n, S, d], b_dec [S, d] (docs/design.md).
The per-source FVU and the relative decoder norm between sources (the model-diffing plot) are
in saetrain/export/decoder_norm_shares.py.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from typing import Any

import torch

from saetrain.dictionaries.base import Dictionary, LatentGroup
from saetrain.dictionaries.layout import CROSSCODER_ARCHITECTURES, _blocks
from saetrain.dictionaries.saelens_names import SINGLE_SITE_LOADERS
from saetrain.planning.site_patterns import KIND_SITES


class CrosscoderMixin(Dictionary):
    """The crosscoder's part, put in front of an architecture class by `crosscoder_class`."""

    kind = "crosscoder"
    kind_architectures = CROSSCODER_ARCHITECTURES
    multi_site = KIND_SITES["crosscoder"].multi_site
    reconstructs_sources = KIND_SITES["crosscoder"].reconstructs_sources
    causal_splice = False  # a source at a later layer is read from the clean forward
    fine_tunable = False
    shardable_kind = False
    saelens_loadable = False
    kind_title = "Crosscoder"
    export_extras = ("decoder_norm_shares",)
    extra_metrics = ("decoder_norm_shares",)
    latent_sharding = None  # its latents read and write several sites: not split over ranks

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        d_out: int | None = None,
        *,
        source_widths: tuple[int, ...] | None = None,
        **kwargs: Any,
    ):
        super().__init__(d_in, n_latents, d_out, **kwargs)
        widths = tuple(source_widths) if source_widths is not None else (d_in,)
        if sum(widths) != d_in or len(set(widths)) != 1:
            raise ValueError(
                f"a crosscoder's sources must be equally wide and add up to d_in={d_in}; "
                f"got widths {widths}"
            )
        self.source_widths = widths

    @property
    def n_sources(self) -> int:
        return len(self.source_widths)

    def source_decoder_norms(self) -> torch.Tensor:
        """[S, n]: the norm of each latent's decoder into each source."""
        return torch.stack([self.W_dec[:, block].norm(dim=1) for block in self._blocks()])

    def decoder_norms(self) -> torch.Tensor:
        return self.source_decoder_norms().sum(0)

    def _blocks(self) -> list[slice]:
        return _blocks(self.source_widths)

    def latent_groups(self, inputs: list[str], targets: list[str]) -> list[LatentGroup]:
        """One group reading all the sources; each latent's direction: its decoders summed over
        the sources."""
        (whole,) = super().latent_groups(inputs, targets)
        d, s = self.source_widths[0], self.n_sources
        summed = self.W_dec.detach().reshape(self.n_latents, s, d).sum(1)
        return [replace(whole, W_dec=summed, more_sites=tuple(inputs[1:]))]

    def about_rows(self, inputs: list[str], sites: tuple[str, ...]) -> dict[str, str]:
        return {
            "sources": ", ".join(sites),
            "kind": "crosscoder (logit effects of each latent's decoders summed over sources)",
        }

    def saelens_architecture(self) -> str:
        return "crosscoder"

    def saelens_fields(self) -> dict[str, Any]:
        return super().saelens_fields() | {
            "crosscoder_architecture": super().saelens_architecture(),
            "n_sources": self.n_sources,
            "d_source": self.source_widths[0],
        }

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        """W_enc [S, d, n], W_dec [n, S, d], b_dec [S, d]; the rest as the architecture's."""
        tensors = super().saelens_tensors()
        s, d, n = self.n_sources, self.source_widths[0], self.n_latents
        tensors["W_enc"] = tensors["W_enc"].reshape(s, d, n)
        tensors["W_dec"] = tensors["W_dec"].reshape(n, s, d)
        tensors["b_dec"] = tensors["b_dec"].reshape(s, d)
        return tensors

    def load_saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_saelens_tensors(flat_crosscoder_tensors(tensors))


def flat_crosscoder_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The exported [S, d, n] / [n, S, d] / [S, d] tensors as the [S·d, n] / [n, S·d] / [S·d]
    the concatenated dictionary computes with."""
    out = dict(tensors)
    if out["W_enc"].dim() == 3:
        s, d, n = out["W_enc"].shape
        out["W_enc"] = out["W_enc"].reshape(s * d, n)
        out["W_dec"] = out["W_dec"].reshape(n, s * d)
        out["b_dec"] = out["b_dec"].reshape(s * d)
    return out


@cache
def crosscoder_class(architecture: type[Dictionary]) -> type[Dictionary]:
    """The crosscoder of an architecture: the mixin in front of it (one class per architecture)."""
    return type(f"Crosscoder{architecture.__name__}", (CrosscoderMixin, architecture), {})


class CrosscoderLoader:
    """Builds a crosscoder from its exported cfg.json and tensors (SAELENS_LOADERS' entry)."""

    @staticmethod
    def from_saelens(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Dictionary:
        inner = SINGLE_SITE_LOADERS[cfg["crosscoder_architecture"]]
        cls = crosscoder_class(inner)
        s, d = int(cfg["n_sources"]), int(cfg["d_source"])
        flat = flat_crosscoder_tensors(tensors)
        dictionary = cls(
            s * d,
            flat["W_enc"].shape[1],
            s * d,
            source_widths=(d,) * s,
            dtype=flat["W_enc"].dtype,
            **inner.init_kwargs_from_saelens(cfg),
        )
        dictionary.load_saelens_tensors(tensors)
        return dictionary
