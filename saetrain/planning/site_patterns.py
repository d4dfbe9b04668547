"""Sites at many layers from one line: `mlp_in.*` with `site.layers`, and what each kind reads.

A `*` in `site.input` / `site.target` stands for every layer of `site.layers` (null: every layer of
the model, known once its config is read). What the pattern makes depends on
`dictionary.kind`:
- single: one dictionary per layer (a transcoder set: `mlp_in.*` → `mlp_out.*`);
- crosscoder: one dictionary reading (and reconstructing) the site at every layer;
- clt: one cross-layer transcoder reading `input.ℓ` and writing `target.ℓ'` for every ℓ' ≥ ℓ.
A dictionary's sites are then two lists, inputs and targets, side by side in its rows; an SAE
or transcoder on one site is the case of one input and one target.
"""

from __future__ import annotations

from dataclasses import dataclass

from saetrain.config import SiteConfig
from saetrain.errors import ConfigError
from saetrain.planning.site_names import SECOND

LAYER = "*"


@dataclass(frozen=True)
class KindSites:
    """What sites a `dictionary.kind` reads and writes: config vocabulary, needed before any
    dictionary exists (the dictionary classes take their `multi_site`, `reconstructs_sources`
    and `writes_later_layers` from here, saetrain/dictionaries/)."""

    # One dictionary over every layer of a `*` pattern (else one dictionary per layer).
    multi_site: bool
    # Its targets are its inputs (a crosscoder); with model_b, each site in both models.
    reconstructs_sources: bool
    # Latents read input.ℓ and write target.ℓ' for every ℓ' ≥ ℓ (a CLT).
    writes_later_layers: bool


KIND_SITES: dict[str, KindSites] = {
    "single": KindSites(multi_site=False, reconstructs_sources=False, writes_later_layers=False),
    "crosscoder": KindSites(multi_site=True, reconstructs_sources=True, writes_later_layers=False),
    "clt": KindSites(multi_site=True, reconstructs_sources=False, writes_later_layers=True),
}
KINDS = tuple(KIND_SITES)


def has_pattern(site: SiteConfig) -> bool:
    """Whether `site.input` or `site.target` holds `*`."""
    return any(LAYER in (value or "") for value in (site.input, site.target))


def at_layer(name: str, layer: int) -> str:
    """`mlp_in.*` at layer 3 → `mlp_in.3` (a name without `*` is returned as it is)."""
    return name.replace(LAYER, str(layer))


def pattern_layers(site: SiteConfig, n_layers: int | None) -> list[int]:
    """The layers a pattern covers: `site.layers`, or every layer of the model (n_layers); with
    neither known yet, layer 0 alone, so that the pattern's shape can be checked early."""
    if site.layers is not None:
        layers = list(site.layers)
        if not layers:
            raise ConfigError("site.layers=[] is empty; list the layers the `*` stands for")
        if sorted(set(layers)) != layers or layers[0] < 0:
            raise ConfigError(
                f"site.layers={layers} must be distinct layers in increasing order, from 0"
            )
        if n_layers is not None and layers[-1] >= n_layers:
            raise ConfigError(
                f"site.layers={layers}: layer {layers[-1]} is out of range; the model has "
                f"{n_layers} layers, valid layers are 0..{n_layers - 1}"
            )
        return layers
    return list(range(n_layers)) if n_layers is not None else [0]


def check_kind(kind: str, site: SiteConfig, two_models: bool = False) -> None:
    """Refuse a site pattern that the kind cannot read, naming the fields. `two_models`: a
    model_b is set, which only a crosscoder reads (each site in both models)."""
    if kind not in KINDS:
        raise ConfigError(
            f"dictionary.kind={kind!r} is not valid; choose one of: {', '.join(KINDS)}"
        )
    if site.layers is not None and not has_pattern(site):
        raise ConfigError(
            f"site.layers={list(site.layers)} needs a `*` in site.input (e.g. site.input=mlp_in.*) "
            f"to stand for those layers; site.input={site.input!r}"
        )
    rules = KIND_SITES[kind]
    fixed_target = site.target is not None and LAYER not in site.target
    if LAYER in site.input and fixed_target and not rules.reconstructs_sources:
        raise ConfigError(
            f"site.target={site.target!r} has no `*` while site.input={site.input!r} has: every "
            "layer's dictionary would predict that one site (a later layer's backwards); write "
            "the target with a `*` too (e.g. site.target=mlp_out.*)"
        )
    if two_models and not rules.reconstructs_sources:
        raise ConfigError(
            f"model_b is read by crosscoders only (each site in both models, for model diffing); "
            f"dictionary.kind={kind!r}: set dictionary.kind=crosscoder or clear model_b.name"
        )
    if not rules.multi_site:
        return
    if LAYER not in site.input and not two_models:
        raise ConfigError(
            f"dictionary.kind={kind} reads a site at several layers: write site.input with a `*` "
            f"for the layer (e.g. site.input=resid_post.* site.layers=[2,4,6]); got "
            f"site.input={site.input!r}"
        )
    target = site.target
    if rules.reconstructs_sources and target is not None and target != site.input:
        raise ConfigError(
            f"dictionary.kind=crosscoder reconstructs its sources: leave site.target null "
            f"(got site.target={target!r})"
        )
    wrong_target = target is None or LAYER not in target or target == site.input
    if rules.writes_later_layers and wrong_target:
        raise ConfigError(
            "dictionary.kind=clt predicts a later site at every layer: set site.target with a `*` "
            f"(e.g. site.input=mlp_in.* site.target=mlp_out.*); got site.target={target!r}"
        )
    if LAYER in (target or "") and LAYER not in site.input:
        raise ConfigError(
            f"site.target={target!r} has a `*` but site.input={site.input!r} has none"
        )


def site_lists(
    site: SiteConfig, kind: str, two_models: bool = False
) -> tuple[list[str], list[str]]:
    """(input sites, target sites) of one dictionary, in layer order.

    For a crosscoder the targets are its inputs (with `two_models`, each site of model a then
    the same sites of model b, `<site>@b`); for an SAE the one target is its input. The `*` must
    already stand for concrete layers (`site.layers` set: dictionary_configs does it).
    """
    rules = KIND_SITES[kind]
    if not rules.multi_site:
        return [site.input], [site.target or site.input]
    if LAYER in site.input:
        assert site.layers is not None, "site.layers is resolved by dictionary_configs"
        inputs = [at_layer(site.input, layer) for layer in site.layers]
    else:
        inputs = [site.input]
    if rules.reconstructs_sources:
        if two_models:
            inputs = inputs + [name + SECOND for name in inputs]
        return inputs, list(inputs)
    assert site.target is not None
    return inputs, [at_layer(site.target, layer) for layer in site.layers]


def layers_label(layers: list[int]) -> str:
    """`0-5` for a contiguous range, `2_4_6` otherwise: part of a folder name."""
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return "_".join(str(layer) for layer in layers)
