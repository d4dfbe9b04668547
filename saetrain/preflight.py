"""What can be checked before anything heavy loads: the model's shape, the data, the extras.

A layer out of range, a `k` above the width the expansion factor gives, a transcoder target the
model does not have, a data folder that does not exist: each is known from the model's config
file (seconds, no weights) and the file system. `preflight()` finds them before the LM loads (a
minute on a CPU) or the buffer fills, and names the field, the value and the valid choices.
"""

from __future__ import annotations

import importlib.util
import logging

from saetrain.activations.model import load_model_config
from saetrain.activations.sites import SUPPORTED_FAMILIES, Site, check_site_exists
from saetrain.activations.tokens import check_dataset
from saetrain.checks import validate
from saetrain.config import Config, second_model
from saetrain.dictionaries import ARCHITECTURES, latents_per_input
from saetrain.errors import ConfigError, SiteError
from saetrain.planning.expand import dictionary_configs
from saetrain.planning.model_shape import ModelShape
from saetrain.planning.site_names import base_site
from saetrain.planning.site_patterns import site_lists
from saetrain.training.finetune import Start, check_start_fits, read_start, starting_config

log = logging.getLogger(__name__)


def preflight(cfg: Config) -> ModelShape:
    """Check the data, the extras and every dictionary against the model's shape; no weights load.

    Raises ConfigError naming the field; returns the shape for the log.
    """
    if cfg.logger.name == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "logger.name='wandb' but wandb is not installed; `pip install wandb` (or "
            "`pip install saetrain[wandb]`), or use logger=console"
        )
    check_dataset(cfg.data)
    shape = ModelShape.of(load_model_config(cfg.model))
    if second_model(cfg) is not None:  # model diffing: the same architecture on the same tokens
        shape_b = ModelShape.of(load_model_config(cfg.model_b))
        if (shape_b.model_type, shape_b.n_layers, shape_b.d_model) != (
            shape.model_type,
            shape.n_layers,
            shape.d_model,
        ):
            raise ConfigError(
                f"model_b.name={cfg.model_b.name!r} is a {shape_b.model_type} with "
                f"{shape_b.n_layers} layers of width {shape_b.d_model}, model.name="
                f"{cfg.model.name!r} a {shape.model_type} with {shape.n_layers} of "
                f"{shape.d_model}: a crosscoder diffs two models of one architecture (e.g. base "
                "and fine-tuned)"
            )
    if shape.model_type not in SUPPORTED_FAMILIES:
        raise ConfigError(
            f"model.name={cfg.model.name!r} is a {shape.model_type!r} model, whose sites saetrain "
            f"does not know; supported model_types: {', '.join(sorted(SUPPORTED_FAMILIES))}"
        )
    if shape.max_positions is not None and cfg.data.context_size > shape.max_positions:
        raise ConfigError(
            f"data.context_size={cfg.data.context_size} exceeds the model's "
            f"max_position_embeddings={shape.max_positions}"
        )
    for i, (_, sub) in enumerate(dictionary_configs(cfg, shape.n_layers)):
        where = f"dictionaries[{i}]." if cfg.dictionaries else ""
        if sub.dictionary.init_from is not None:
            sub, _ = starting_point(sub, shape, where)
        check_dictionary(sub, shape, where)
    log.info(
        "preflight: %s (%d layers, d_model %d), data and %d dictionar%s checked",
        cfg.model.name,
        shape.n_layers,
        shape.d_model,
        len(cfg.dictionaries) or 1,
        "y" if len(cfg.dictionaries) <= 1 else "ies",
    )
    return shape


def starting_point(cfg: Config, shape: ModelShape, where: str = "") -> tuple[Config, Start]:
    """dictionary.init_from's folder, read and checked against the model's sites (widths, SAE or
    transcoder), and `cfg` with the settings taken from it (saetrain/training/finetune.py)."""
    assert cfg.dictionary.init_from is not None
    target = cfg.site.target or cfg.site.input
    try:
        start = read_start(cfg.dictionary.init_from, cfg.site.input, target)
        sites = [Site.parse(base_site(name)) for name in (cfg.site.input, target)]
        d_in, d_out = (shape.width(site) for site in sites)
        label = cfg.site.input if target == cfg.site.input else f"{cfg.site.input} → {target}"
        check_start_fits(start, d_in, d_out, target != cfg.site.input, label)
        cfg = starting_config(cfg, start, d_in)
        validate(cfg)  # the taken settings against the run's (e.g. target_l0 with topk)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    return cfg, start


def check_dictionary(cfg: Config, shape: ModelShape, where: str = "") -> None:
    """One dictionary's sites and sizes against the model: layers in range, k, aux_k and the
    Matryoshka prefixes within the number of latents the expansion factor gives."""
    inputs, targets = site_lists(cfg.site, cfg.dictionary.kind, second_model(cfg) is not None)
    sites: dict[str, Site] = {}
    for name, values in (("input", inputs), ("target", targets)):
        for value in values:
            site = Site.parse(base_site(value))
            if site.layer >= shape.n_layers:
                raise ConfigError(
                    f"{where}site.{name}={value!r}: layer {site.layer} is out of range; the model "
                    f"has {shape.n_layers} layers, valid layers are 0..{shape.n_layers - 1}"
                )
            try:
                check_site_exists(shape.model_type, shape.config, site)
            except SiteError as e:
                raise ConfigError(f"{where}site.{name}: {e}") from None
            sites.setdefault(name, site)
    d_in = shape.width(sites["input"])
    d = cfg.dictionary
    n_latents = latents_per_input(d, d_in)
    origin = (
        f"{where}dictionary.n_latents={n_latents}"
        if d.n_latents is not None
        else f"{where}dictionary.expansion_factor={d.expansion_factor} × d_in={d_in} = "
        f"{n_latents} latents"
    )
    architecture = ARCHITECTURES[d.architecture]
    if architecture.selects_k and d.k > n_latents:
        raise ConfigError(f"{where}dictionary.k={d.k} exceeds {origin}")
    if d.aux_k is not None and d.aux_k > n_latents:
        raise ConfigError(f"{where}dictionary.aux_k={d.aux_k} exceeds {origin}")
    prefixes = d.matryoshka_prefixes
    if architecture.nested_prefixes and prefixes and prefixes[-1] != n_latents:
        raise ConfigError(
            f"{where}dictionary.matryoshka_prefixes={list(prefixes)} must end with the number of "
            f"latents ({origin})"
        )
