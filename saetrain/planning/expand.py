"""The dictionaries a run trains, from one config: the `dictionaries` list's overrides applied to
the run's groups, `*` site patterns expanded over their layers, each dictionary's folder name, and
site names in their canonical spelling.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from saetrain.config import Config, DictionarySpec, SiteConfig, second_model
from saetrain.errors import ConfigError, SiteError
from saetrain.planning.site_names import Site
from saetrain.planning.site_patterns import (
    KIND_SITES,
    LAYER,
    at_layer,
    check_kind,
    has_pattern,
    layers_label,
    pattern_layers,
)

# Trainer fields that belong to the shared stream, not to one dictionary.
STREAM_TRAINER_FIELDS = ("total_tokens", "batch_tokens", "init_batches")


def site_folder(site: SiteConfig) -> str:
    """The output folder of a dictionary on `site`: the site, or `input-target` for transcoders;
    over several layers, `*` becomes the layers (`resid_post.2_4_6`, `mlp_in.0-5-mlp_out.0-5`)."""
    if site.layers is not None:
        label = layers_label(list(site.layers))
        site = SiteConfig(
            input=site.input.replace(LAYER, label),
            target=site.target.replace(LAYER, label) if site.target else None,
        )
    target = site.target or site.input
    return site.input if target == site.input else f"{site.input}-{target}"


def merged(base: Any, overrides: Any, where: str) -> Any:
    """`base` (a dataclass) with `overrides` (a mapping) applied, type-checked by OmegaConf."""
    if overrides is None:
        return copy.deepcopy(base)
    try:
        node = OmegaConf.merge(OmegaConf.structured(base), overrides)
        return OmegaConf.to_object(node)
    except (OmegaConfBaseException, ValueError) as e:
        message = str(e).split("\n")[0]
        raise ConfigError(f"{where}: {message}") from None


def dictionary_configs(cfg: Config, n_layers: int | None = None) -> list[tuple[str, Config]]:
    """(output folder name, full config) of every dictionary the run trains.

    Without `dictionaries` that is the run's own config; otherwise each entry's overrides applied
    to the run's site / dictionary / trainer / seed. A `*` site pattern is then expanded over
    `site.layers` (or the model's `n_layers` layers; layer 0 alone while that is unknown, to check
    the pattern early): one dictionary per layer for dictionary.kind=single, the layer list set on
    the one crosscoder or CLT otherwise (saetrain/planning/site_patterns.py).
    """
    if not cfg.dictionaries:
        return _named(_expand_patterns([(None, cfg)], n_layers))
    subs: list[tuple[str | None, Config]] = []
    for i, spec in enumerate(cfg.dictionaries):
        where = f"dictionaries[{i}]"
        if isinstance(spec, dict):
            spec = merged(DictionarySpec(), spec, where)
        trainer = merged(cfg.trainer, spec.trainer, f"{where}.trainer")
        for name in STREAM_TRAINER_FIELDS:
            if getattr(trainer, name) != getattr(cfg.trainer, name):
                raise ConfigError(
                    f"{where}.trainer.{name}={getattr(trainer, name)!r}: all dictionaries of a "
                    f"run share one activation stream; set trainer.{name} for the whole run"
                )
        try:
            site = _canonical_site(merged(cfg.site, spec.site, f"{where}.site"))
        except ConfigError as e:
            raise ConfigError(f"{where}.{e}" if str(e).startswith("site.") else str(e)) from None
        sub = dataclasses.replace(
            cfg,
            site=site,
            dictionary=merged(cfg.dictionary, spec.dictionary, f"{where}.dictionary"),
            trainer=trainer,
            seed=cfg.seed if spec.seed is None else spec.seed,
            dictionaries=[],
        )
        subs.append((spec.name, sub))
    return _named(_expand_patterns(subs, n_layers))


def _named(subs: list[tuple[str | None, Config]]) -> list[tuple[str, Config]]:
    """Every dictionary's folder name: its entry's `name`, else its site (with its index when
    several share one)."""
    folders = [site_folder(sub.site) for _, sub in subs]
    return [
        (name or (folders[i] if folders.count(folders[i]) == 1 else f"{folders[i]}-{i}"), sub)
        for i, (name, sub) in enumerate(subs)
    ]


def _expand_patterns(
    subs: list[tuple[str | None, Config]], n_layers: int | None
) -> list[tuple[str | None, Config]]:
    """The dictionaries with every `*` pattern over its layers (see dictionary_configs)."""
    expanded: list[tuple[str | None, Config]] = []
    for name, sub in subs:
        check_kind(sub.dictionary.kind, sub.site, second_model(sub) is not None)
        if not has_pattern(sub.site):
            expanded.append((name, sub))
            continue
        layers = pattern_layers(sub.site, n_layers)
        if KIND_SITES[sub.dictionary.kind].multi_site:  # one dictionary over all the layers
            site = dataclasses.replace(sub.site, layers=layers)
            expanded.append((name, dataclasses.replace(sub, site=site)))
            continue
        for layer in layers:  # one dictionary per layer
            site = SiteConfig(
                input=at_layer(sub.site.input, layer),
                target=at_layer(sub.site.target, layer) if sub.site.target else None,
            )
            per_layer = dataclasses.replace(sub, site=_canonical_site(site))
            expanded.append((f"{name}.{layer}" if name else None, per_layer))
    return expanded


def canonical_sites(cfg: Config) -> Config:
    """`cfg` with site names in their canonical spelling (`blocks.6.hook_resid_post` →
    `resid_post.6`), so folders, checkpoints and exports agree however a site was written."""
    return dataclasses.replace(cfg, site=_canonical_site(cfg.site))


def _canonical_site(site: SiteConfig) -> SiteConfig:
    out = {}
    for name in ("input", "target"):
        value = getattr(site, name)
        if value is None:
            continue
        try:
            parsed = Site.parse(at_layer(value, 0))  # a pattern keeps its `*`
            out[name] = f"{parsed.kind}.{LAYER}" if LAYER in value else parsed.name
        except SiteError as e:
            raise ConfigError(f"site.{name}: {e}") from None
    return dataclasses.replace(site, **out)
