"""Sparse dictionary architectures, one file each, on the shared base in base.py."""

from __future__ import annotations

import torch

from saetrain.config import DictionaryConfig
from saetrain.dictionaries.base import Dictionary, SparseCodes, TrainOutput
from saetrain.dictionaries.topk import TopKSAE

ARCHITECTURES: dict[str, type[Dictionary]] = {TopKSAE.architecture: TopKSAE}


def build_dictionary(
    cfg: DictionaryConfig,
    d_in: int,
    d_out: int,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> Dictionary:
    """A freshly initialised dictionary as the config describes."""
    from saetrain.activations.model import TORCH_DTYPES

    n_latents = cfg.n_latents or cfg.expansion_factor * d_in
    common = {
        "dtype": TORCH_DTYPES[cfg.dtype],
        "device": device,
        "generator": generator,
    }
    if cfg.architecture == "topk":
        return TopKSAE(
            d_in,
            n_latents,
            d_out,
            k=cfg.k,
            aux_k=cfg.aux_k,
            aux_k_coefficient=cfg.aux_k_coefficient,
            **common,
        )
    raise ValueError(
        f"dictionary.architecture={cfg.architecture!r}; choose one of: {', '.join(ARCHITECTURES)}"
    )


__all__ = [
    "ARCHITECTURES",
    "Dictionary",
    "SparseCodes",
    "TrainOutput",
    "TopKSAE",
    "build_dictionary",
]
