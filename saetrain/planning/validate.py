"""Checks of a whole config that its types cannot express: choices, ranges, relations between
fields, and every dictionary of a `dictionaries` list — each error names the field, the value and
the valid choices, before any model or data is read. `to_config` is the one way a composed Hydra
node becomes a checked `Config` (the CLI and the Python API both call it).
"""

from __future__ import annotations

import os
from typing import Any

from saetrain.config import Config, second_model
from saetrain.errors import ConfigError, SiteError
from saetrain.planning.expand import dictionary_configs
from saetrain.planning.site_names import Site, forward_position
from saetrain.planning.site_patterns import KIND_SITES, at_layer, check_kind, has_pattern

DTYPES = ("float32", "bfloat16", "float16")
# float16 parameters underflow Adam's epsilon and updates (NaN within a few steps).
DICTIONARY_DTYPES = ("float32", "bfloat16")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
SAMPLE_BY = ("document", "paragraph", "line")
PACKINGS = ("concat", "document")
LOGGERS = ("console", "wandb")


def choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"{field_name}={value!r} is not valid; choose one of: {', '.join(choices)}"
        )


def positive(field_name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{field_name}={value!r} is not valid; it must be {bound}")


def validate_fields(cfg: Config) -> None:
    """Check choices and ranges that the types alone cannot express, and relations between
    fields, of the run and of every dictionary it trains: everything that needs neither a
    dictionary class nor an evaluation suite (saetrain/checks.py adds theirs)."""
    _validate_one(cfg)
    positive("inspect.n_tokens", cfg.inspect.n_tokens)
    positive("inspect.top_k", cfg.inspect.top_k)
    choice("inspect.features", cfg.inspect.features, ("auto", "always", "never"))
    if cfg.dictionaries:
        names: dict[str, int] = {}
        for i, (name, sub) in enumerate(dictionary_configs(cfg)):
            try:
                _validate_one(sub)
            except ConfigError as e:
                raise ConfigError(f"dictionaries[{i}]: {e}") from None
            if name in names:
                raise ConfigError(
                    f"dictionaries[{i}] and dictionaries[{names[name]}] both write to folder "
                    f"{name!r}; give one of them a `name`"
                )
            names[name] = i


def _validate_one(cfg: Config) -> None:
    choice("model.dtype", cfg.model.dtype, DTYPES)
    choice("buffer.dtype", cfg.buffer.dtype, DTYPES)
    choice("dictionary.dtype", cfg.dictionary.dtype, DICTIONARY_DTYPES)
    choice("dictionary.b_dec_init", cfg.dictionary.b_dec_init, B_DEC_INITS)
    if cfg.dictionary.encoder_init_norm is not None:
        positive("dictionary.encoder_init_norm", cfg.dictionary.encoder_init_norm)
    choice("logger.name", cfg.logger.name, LOGGERS)
    choice("data.sample_by", cfg.data.sample_by, SAMPLE_BY)
    choice("data.packing", cfg.data.packing, PACKINGS)
    if cfg.buffer.prefetch_batches is not None:
        positive("buffer.prefetch_batches", cfg.buffer.prefetch_batches, allow_zero=True)
    positive("cache.shard_tokens", cfg.cache.shard_tokens)
    positive("checkpoint.every_tokens", cfg.checkpoint.every_tokens, allow_zero=True)
    positive("checkpoint.keep_last", cfg.checkpoint.keep_last)
    positive("distributed.timeout_s", cfg.distributed.timeout_s)
    choice("distributed.assign", cfg.distributed.assign, ("balanced", "round_robin"))
    if cfg.model.gguf_package and _names_a_hub_model_or_folder(cfg.model.name):
        raise ConfigError(
            f"model.name={cfg.model.name!r} names a hub model or a folder, but "
            f"model.gguf_package={cfg.model.gguf_package!r} is still set, which would load the "
            "GGUF file that package ships instead; clear it: model.gguf_package=null"
        )
    if cfg.model.device not in ("auto", "cpu") and not cfg.model.device.startswith("cuda"):
        raise ConfigError(
            f"model.device={cfg.model.device!r} is not valid; choose one of: auto, cpu, cuda, "
            "cuda:N"
        )
    if not cfg.data.data_files and cfg.data.path in ("text", "json", "parquet", "csv"):
        raise ConfigError(f"data.data_files is empty; data.path={cfg.data.path!r} needs files")
    for name, value in [
        ("data.context_size", cfg.data.context_size),
        ("buffer.size_tokens", cfg.buffer.size_tokens),
        ("buffer.lm_batch_contexts", cfg.buffer.lm_batch_contexts),
        ("dictionary.k", cfg.dictionary.k),
        ("dictionary.expansion_factor", cfg.dictionary.expansion_factor),
        ("trainer.dead_after_tokens", cfg.trainer.dead_after_tokens),
        ("trainer.total_tokens", cfg.trainer.total_tokens),
        ("trainer.batch_tokens", cfg.trainer.batch_tokens),
        ("trainer.init_batches", cfg.trainer.init_batches),
        ("eval.n_tokens", cfg.eval.n_tokens),
        ("eval.batch_contexts", cfg.eval.batch_contexts),
        ("eval.ce_contexts", cfg.eval.ce_contexts),
        ("logger.log_every", cfg.logger.log_every),
    ]:
        positive(name, value)
    if not 0.0 < cfg.data.holdout_percent < 100.0:
        raise ConfigError(f"data.holdout_percent={cfg.data.holdout_percent} must be in (0, 100)")
    if cfg.data.context_size < 2:
        raise ConfigError(f"data.context_size={cfg.data.context_size} must be at least 2")
    if cfg.dictionary.n_latents is not None:
        positive("dictionary.n_latents", cfg.dictionary.n_latents)
        if cfg.dictionary.k > cfg.dictionary.n_latents:
            raise ConfigError(
                f"dictionary.k={cfg.dictionary.k} exceeds dictionary.n_latents="
                f"{cfg.dictionary.n_latents}"
            )
    if cfg.dictionary.aux_k is not None:
        positive("dictionary.aux_k", cfg.dictionary.aux_k)
    positive("dictionary.aux_k_coefficient", cfg.dictionary.aux_k_coefficient, allow_zero=True)
    if cfg.trainer.lr is not None:
        positive("trainer.lr", cfg.trainer.lr)
    positive("trainer.warmup_steps", cfg.trainer.warmup_steps, allow_zero=True)
    positive("trainer.adam_eps", cfg.trainer.adam_eps)
    for name in ("adam_beta1", "adam_beta2"):
        beta = getattr(cfg.trainer, name)
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"trainer.{name}={beta} must be in [0, 1)")
    positive("trainer.grad_clip", cfg.trainer.grad_clip, allow_zero=True)
    if not 0.0 <= cfg.trainer.decay_fraction < 1.0:
        raise ConfigError(f"trainer.decay_fraction={cfg.trainer.decay_fraction} must be in [0, 1)")
    if cfg.buffer.size_tokens < 2 * cfg.trainer.batch_tokens:
        raise ConfigError(
            f"buffer.size_tokens={cfg.buffer.size_tokens} must be at least twice "
            f"trainer.batch_tokens={cfg.trainer.batch_tokens} (the buffer refills at half)"
        )
    check_kind(cfg.dictionary.kind, cfg.site, second_model(cfg) is not None)
    # A `*` pattern is checked at layer 0: every layer has the same kinds of site.
    site_in = at_layer(cfg.site.input, 0)
    site_out = at_layer(cfg.site.target, 0) if cfg.site.target is not None else None
    for name, value in (("input", site_in), ("target", site_out)):
        if value is None:
            continue
        try:
            Site.parse(value)
        except SiteError as e:
            raise ConfigError(f"site.{name}: {e}") from None
    transcoder = site_out is not None and cfg.site.target != cfg.site.input
    if cfg.dictionary.skip and not transcoder:
        raise ConfigError(
            "dictionary.skip=true makes a skip transcoder: set site.target to a site other than "
            f"site.input={cfg.site.input!r}"
        )
    if transcoder:
        assert site_out is not None
        source, target = Site.parse(site_in), Site.parse(site_out)
        if forward_position(target) <= forward_position(source):
            raise ConfigError(
                f"site.target={cfg.site.target!r} does not come after site.input="
                f"{cfg.site.input!r} in the forward; a transcoder predicts a later activation "
                "(e.g. mlp_in.L → mlp_out.L)"
            )
    _check_init_from(cfg)


def _check_init_from(cfg: Config) -> None:
    """dictionary.init_from: what a run can start from a folder (its contents: preflight)."""
    folder = cfg.dictionary.init_from
    if folder is None:
        return
    where = f"dictionary.init_from={folder!r}"
    if not folder.strip():
        raise ConfigError(f"{where} is empty; name a dictionary folder, or null for a new one")
    if has_pattern(cfg.site) and not KIND_SITES[cfg.dictionary.kind].multi_site:
        raise ConfigError(
            f"{where} names one dictionary, but site.input={cfg.site.input!r} trains one per "
            "layer; give each layer its own `dictionaries` entry with its dictionary.init_from"
        )
    if cfg.distributed.shard_latents:
        raise ConfigError(
            f"{where} cannot start a dictionary split over ranks (distributed.shard_latents=true)"
        )


def _names_a_hub_model_or_folder(name: str) -> bool:
    """`org/model`, `./folder`, `~/folder`, `/abs/folder`: not a label for a packaged GGUF file."""
    return "/" in name or os.sep in name or name.startswith((".", "~")) or os.path.isdir(name)
