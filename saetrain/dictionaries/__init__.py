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
from saetrain.dictionaries.clt import CLT_CLASSES, CLTLoader, CLTStructure
from saetrain.dictionaries.crosscoder import CrosscoderLoader, CrosscoderMixin, crosscoder_class
from saetrain.dictionaries.gated import GatedSAE
from saetrain.dictionaries.jumprelu import JumpReLUSAE
from saetrain.dictionaries.layout import Layout
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
# Crosscoders and CLTs have layouts of their own (docs/design.md) and saetrain's names.
SAELENS_LOADERS: dict[str, type[Dictionary] | type[CrosscoderLoader] | type[CLTLoader]] = {
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
    "crosscoder": CrosscoderLoader,
    "clt": CLTLoader,
}


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
    from saetrain.activations.model import TORCH_DTYPES

    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(
            f"dictionary.architecture={cfg.architecture!r}; choose one of: "
            f"{', '.join(ARCHITECTURES)}"
        )
    layout = layout or Layout.single(d_in, d_out)
    cls: type[Dictionary] = ARCHITECTURES[cfg.architecture]
    kwargs = cls.init_kwargs_from_config(cfg)
    per_layer_in = layout.in_widths[0]
    n_latents = cfg.n_latents or cfg.expansion_factor * per_layer_in
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
        n_latents *= len(layout.in_widths)
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
    "build_dictionary",
    "fired_latents",
    "firing_counts",
]
