"""The names a config or a folder uses → the classes that know what they mean.

`dictionary.architecture` → its class (ARCHITECTURES), `dictionary.kind` → its kind's class
(KINDS: the base for single, the crosscoder mixin, the CLT structure), cfg.json's `architecture`
→ the class that loads it (SAELENS_LOADERS). What an architecture or a kind means (its family,
how it is split over ranks, which sites it reads, how many latents it holds, its extra outputs)
is on those classes as class attributes, so that the planning code, the run, evaluation,
export and inspect ask them by name, before any dictionary is built.
"""

from __future__ import annotations

from saetrain.config import DictionaryConfig
from saetrain.dictionaries.base import Dictionary
from saetrain.dictionaries.batchtopk import BatchTopKSAE
from saetrain.dictionaries.clt import CLTLoader, CLTStructure
from saetrain.dictionaries.crosscoder import CrosscoderLoader, CrosscoderMixin
from saetrain.dictionaries.gated import GatedSAE
from saetrain.dictionaries.jumprelu import JumpReLUSAE
from saetrain.dictionaries.matryoshka import MatryoshkaSAE
from saetrain.dictionaries.relu import ReLUSAE
from saetrain.dictionaries.saelens_names import SAELENS_SAE_NAMES, SINGLE_SITE_LOADERS
from saetrain.dictionaries.topk import TopKSAE

# `dictionary.architecture` → class.
ARCHITECTURES: dict[str, type[Dictionary]] = {
    cls.architecture: cls
    for cls in (ReLUSAE, GatedSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE)
}

# `dictionary.kind` → the class holding what the kind means (its class attributes).
KINDS: dict[str, type[Dictionary]] = {
    "single": Dictionary,
    "crosscoder": CrosscoderMixin,
    "clt": CLTStructure,
}

# cfg.json's `architecture` → the class that loads it. SAELens's names where SAELens has the
# architecture; BatchTopK and Matryoshka export as JumpReLU: what they compute at inference.
# Crosscoders and CLTs have layouts of their own (docs/design.md) and saetrain's names.
SAELENS_LOADERS: dict[str, type[Dictionary] | type[CrosscoderLoader] | type[CLTLoader]] = {
    **SINGLE_SITE_LOADERS,
    "crosscoder": CrosscoderLoader,
    "clt": CLTLoader,
}


def architecture_named(name: str) -> type[Dictionary] | None:
    """The class of saetrain's architecture `name`, or of an SAE architecture SAELens names
    otherwise (`standard`: ReLU); None for a name neither uses."""
    return ARCHITECTURES.get(SAELENS_SAE_NAMES.get(name, name))


def latents_per_input(cfg: DictionaryConfig, d_in: int) -> int:
    """`dictionary.n_latents`, or expansion_factor × `d_in` (one input site's width): the
    dictionary's latents, or one layer's for a CLT (`Dictionary.latents_per_input`)."""
    return cfg.n_latents if cfg.n_latents is not None else cfg.expansion_factor * d_in


def configured_latents(cfg: DictionaryConfig, in_widths: tuple[int, ...]) -> int:
    """The latents of the dictionary `cfg` describes over input sites of these widths."""
    per_input = latents_per_input(cfg, in_widths[0])
    return KINDS[cfg.kind].latent_count(per_input, len(in_widths))


def shardable_architectures() -> tuple[str, ...]:
    """The architectures distributed.shard_latents splits, in the order errors list them: the
    TopK selections, then the elementwise activations."""
    return tuple(
        name
        for way in ("selection", "sums")
        for name, cls in ARCHITECTURES.items()
        if cls.latent_sharding == way
    )


__all__ = [
    "ARCHITECTURES",
    "KINDS",
    "SAELENS_LOADERS",
    "architecture_named",
    "configured_latents",
    "latents_per_input",
    "shardable_architectures",
]
