"""What inspect needs of a dictionary, and one LM pass that feeds every dictionary's collector.

An `InspectUnit` is one set of latents that reads one site: its codes (`encode`) and the decoder
rows whose logit effects are shown (`W_dec`). A saved SAE or transcoder is one unit; a
cross-layer transcoder is one unit per layer (each layer's encoder, and that layer's decoder
rows summed over the layers they write to); anything exposing `encode(x)` and `W_dec` fits.
Units that read the same site share the LM's activations, and all units share one LM pass.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from saetrain.dictionaries.base import Codes, LatentGroup
from saetrain.inspect.collect import CollectSettings, LatentCollector, LatentStats, dense_codes
from saetrain.progress import Progress


@dataclass
class InspectUnit:
    """One set of latents to inspect."""

    name: str  # the folder name; circuit-tracer's transcoder_id
    input_site: str  # where `encode` reads, e.g. mlp_in.3
    target_site: str  # where W_dec writes (the input site for an SAE)
    encode: Callable[[torch.Tensor], Codes]  # raw activations [N, d_in] → codes
    n_latents: int
    W_dec: torch.Tensor  # [n_latents, d_out]: the directions whose logit effects are shown
    # More sites `encode` reads, side by side after input_site (a crosscoder's other sources).
    more_sites: tuple[str, ...] = ()

    @property
    def sites(self) -> tuple[str, ...]:
        """Every site `encode` reads, in the order its columns are given."""
        return (self.input_site, *self.more_sites)

    @property
    def layer(self) -> int:
        """The layer the unit reads (circuit-tracer indexes feature files by it)."""
        match = re.search(r"\.(\d+)$", self.input_site)
        if match is None:
            raise ValueError(f"site {self.input_site!r} names no layer")
        return int(match.group(1))


def unit_from_dictionary(name: str, dictionary, input_site: str, target_site: str) -> InspectUnit:
    """A saved saetrain / SAELens SAE or transcoder as a unit (it reads its first d_in columns)."""
    return _unit(name, dictionary.latent_groups([input_site], [target_site])[0])


def units_of(name: str, dictionary, inputs: list[str], targets: list[str]) -> list[InspectUnit]:
    """A dictionary's units, one per `Dictionary.latent_groups`: itself for an SAE or
    transcoder; one per layer for a cross-layer transcoder (`<name>.L<layer>`: that layer's
    encoder on its own input, and its latents' decoders summed over the layers they write); a
    crosscoder is one unit reading all its sources (its logit effects: each latent's decoders
    summed over the sources)."""
    return [_unit(name, group) for group in dictionary.latent_groups(inputs, targets)]


def _unit(name: str, group: LatentGroup) -> InspectUnit:
    return InspectUnit(
        name + group.suffix,
        group.input_site,
        group.target_site,
        group.encode,
        group.n_latents,
        group.W_dec,
        group.more_sites,
    )


@torch.no_grad()
def collect_all(
    source,
    units: list[InspectUnit],
    batches: Iterable,
    settings: CollectSettings,
    total_tokens: int | None = None,
) -> dict[str, LatentStats]:
    """Run the LM once over `batches` (TokenBatch) and every unit over its site's activations.

    `source` is an ActivationSource over the units' input sites (it stops after the deepest).
    Progress lines count tokens (tok/s, ETA when `total_tokens` is given).
    """
    collectors: dict[str, LatentCollector] = {}
    for unit in units:
        if unit.name in collectors:
            raise ValueError(f"two units named {unit.name!r}")
        collectors[unit.name] = LatentCollector(
            unit.n_latents, _context_size(batches), settings, unit.W_dec.device
        )
    with Progress("inspect", total_tokens, "tok") as progress:
        for batch in batches:
            acts = source(batch.input_ids)
            b, t = batch.input_ids.shape
            for unit in units:
                x = (
                    acts[unit.input_site]
                    if not unit.more_sites
                    else torch.cat([acts[site] for site in unit.sites], dim=-1)
                )
                codes = dense_codes(unit.encode(x.reshape(b * t, -1)), unit.n_latents)
                collectors[unit.name].update(
                    codes.reshape(b, t, unit.n_latents), batch.input_ids, batch.mask
                )
            progress.update(b * t)
    return {name: c.result() for name, c in collectors.items()}


def _context_size(batches: Iterable) -> int:
    if not isinstance(batches, list) or not batches:
        raise ValueError("collect_all takes a non-empty list of TokenBatch")
    return int(batches[0].input_ids.shape[1])
