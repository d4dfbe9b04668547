"""Sparse dictionary architectures, one file each, on the shared base in base.py."""

from __future__ import annotations

import torch

from saetrain.config import DictionaryConfig
from saetrain.dictionaries.base import (
    Codes,
    Dictionary,
    SparseCodes,
    TrainOutput,
    active_count,
    fired_latents,
    firing_counts,
)
from saetrain.dictionaries.batchtopk import BatchTopKSAE
from saetrain.dictionaries.gated import GatedSAE
from saetrain.dictionaries.jumprelu import JumpReLUSAE
from saetrain.dictionaries.matryoshka import MatryoshkaSAE
from saetrain.dictionaries.relu import ReLUSAE
from saetrain.dictionaries.topk import TopKSAE

# `dictionary.architecture` → class.
ARCHITECTURES: dict[str, type[Dictionary]] = {
    cls.architecture: cls
    for cls in (ReLUSAE, GatedSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE)
}

# cfg.json's `architecture` → the class that loads it. SAELens's names where SAELens has the
# architecture; BatchTopK and Matryoshka export as JumpReLU: what they compute at inference.
SAELENS_LOADERS: dict[str, type[Dictionary]] = {
    "standard": ReLUSAE,
    "transcoder": ReLUSAE,
    "skip_transcoder": ReLUSAE,
    "gated": GatedSAE,
    "gated_skip_transcoder": GatedSAE,
    "topk": TopKSAE,
    "topk_skip_transcoder": TopKSAE,
    "jumprelu": JumpReLUSAE,
    "jumprelu_transcoder": JumpReLUSAE,
    "jumprelu_skip_transcoder": JumpReLUSAE,
}


def build_dictionary(
    cfg: DictionaryConfig,
    d_in: int,
    d_out: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    transcoder: bool = False,
) -> Dictionary:
    """A freshly initialised dictionary as the config describes."""
    from saetrain.activations.model import TORCH_DTYPES

    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(
            f"dictionary.architecture={cfg.architecture!r}; choose one of: "
            f"{', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[cfg.architecture](
        d_in,
        cfg.n_latents or cfg.expansion_factor * d_in,
        d_out,
        transcoder=transcoder,
        skip=cfg.skip,
        dtype=TORCH_DTYPES[cfg.dtype],
        device=device,
        generator=generator,
        encoder_init_norm=cfg.encoder_init_norm,
        **ARCHITECTURES[cfg.architecture].init_kwargs_from_config(cfg),
    )


__all__ = [
    "ARCHITECTURES",
    "SAELENS_LOADERS",
    "BatchTopKSAE",
    "Codes",
    "Dictionary",
    "GatedSAE",
    "JumpReLUSAE",
    "MatryoshkaSAE",
    "ReLUSAE",
    "SparseCodes",
    "TopKSAE",
    "TrainOutput",
    "active_count",
    "build_dictionary",
    "fired_latents",
    "firing_counts",
]
