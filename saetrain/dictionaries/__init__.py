"""Sparse dictionary architectures, one file each, on the shared base in base.py."""

from __future__ import annotations

import torch

from saetrain.activations.model import TORCH_DTYPES
from saetrain.config import DictionaryConfig
from saetrain.dictionaries.base import (
    Codes,
    Dictionary,
    LatentGroup,
    SparseCodes,
    TrainOutput,
    active_count,
    fired_latents,
    firing_counts,
)
from saetrain.dictionaries.batchtopk import BatchTopKSAE
from saetrain.dictionaries.clt import CLT_CLASSES, CLTStructure
from saetrain.dictionaries.crosscoder import CrosscoderMixin, crosscoder_class
from saetrain.dictionaries.gated import GatedSAE
from saetrain.dictionaries.jumprelu import JumpReLUSAE
from saetrain.dictionaries.layout import Layout
from saetrain.dictionaries.matryoshka import MatryoshkaSAE
from saetrain.dictionaries.registry import (
    ARCHITECTURES,
    KINDS,
    SAELENS_LOADERS,
    architecture_named,
    configured_latents,
    latents_per_input,
    shardable_architectures,
)
from saetrain.dictionaries.relu import ReLUSAE
from saetrain.dictionaries.topk import TopKSAE


def build_dictionary(
    cfg: DictionaryConfig,
    d_in: int,
    d_out: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    transcoder: bool = False,
    layout: Layout | None = None,
) -> Dictionary:
    """A freshly initialised dictionary as the config describes.

    `layout` gives the widths of its sites when it reads several (dictionary.kind crosscoder or
    clt); d_in / d_out are then their sums. The expansion factor multiplies one site's width; a
    CLT's n_latents counts one layer's latents.
    """
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(
            f"dictionary.architecture={cfg.architecture!r}; choose one of: "
            f"{', '.join(ARCHITECTURES)}"
        )
    if cfg.kind not in KINDS:
        raise ValueError(f"dictionary.kind={cfg.kind!r}; choose one of: {', '.join(KINDS)}")
    layout = layout or Layout.single(d_in, d_out)
    cls: type[Dictionary] = ARCHITECTURES[cfg.architecture]
    kwargs = cls.init_kwargs_from_config(cfg)
    n_latents = configured_latents(cfg, layout.in_widths)
    if cfg.kind == "crosscoder":
        cls = crosscoder_class(cls)
        kwargs["source_widths"] = layout.in_widths
    elif cfg.kind == "clt":
        if cfg.architecture not in CLT_CLASSES:
            raise ValueError(
                f"dictionary.architecture={cfg.architecture!r} is not trained as a CLT; choose "
                f"one of: {', '.join(CLT_CLASSES)}"
            )
        cls = CLT_CLASSES[cfg.architecture]
        kwargs["n_layers"] = len(layout.in_widths)
        transcoder = True
    return cls(
        layout.d_in,
        n_latents,
        layout.d_out,
        transcoder=transcoder,
        skip=cfg.skip,
        dtype=TORCH_DTYPES[cfg.dtype],
        device=device,
        generator=generator,
        encoder_init_norm=cfg.encoder_init_norm,
        **kwargs,
    )


__all__ = [
    "ARCHITECTURES",
    "CLTStructure",
    "CrosscoderMixin",
    "KINDS",
    "LatentGroup",
    "Layout",
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
    "architecture_named",
    "build_dictionary",
    "configured_latents",
    "fired_latents",
    "firing_counts",
    "latents_per_input",
    "shardable_architectures",
]
