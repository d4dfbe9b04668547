"""Checks of a whole config that its types cannot express: choices, ranges, relations between
fields, and every dictionary of a `dictionaries` list — each error names the field, the value and
the valid choices, before any model or data is read. `to_config` is the one way a composed Hydra
node becomes a checked `Config` (the CLI and the Python API both call it).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from omegaconf import OmegaConf

from saetrain.activations.sites import Site, forward_position
from saetrain.config import SUITE_NAMES, Config, EvalConfig, SparseProbingConfig, second_model
from saetrain.dictionaries import ARCHITECTURES
from saetrain.dictionaries.jumprelu import PRE_ACT_LATENTS, SPARSITY_LOSSES
from saetrain.dictionaries.layout import check_cross_layer
from saetrain.dictionaries.matryoshka import MATRYOSHKA_REDUCTIONS
from saetrain.dictionaries.topk import AUX_K_NORMALIZATIONS
from saetrain.errors import ConfigError, SiteError
from saetrain.evaluation.usefulness.probing_tasks import check_task_entry
from saetrain.planning.expand import canonical_sites, dictionary_configs
from saetrain.planning.keys import check_known_keys
from saetrain.planning.site_patterns import at_layer, check_kind, has_pattern

DTYPES = ("float32", "bfloat16", "float16")
# float16 parameters underflow Adam's epsilon and updates (NaN within a few steps).
DICTIONARY_DTYPES = ("float32", "bfloat16")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
SAMPLE_BY = ("document", "paragraph", "line")
PACKINGS = ("concat", "document")
LOGGERS = ("console", "wandb")


def _choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"{field_name}={value!r} is not valid; choose one of: {', '.join(choices)}"
        )


def _positive(field_name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{field_name}={value!r} is not valid; it must be {bound}")


def _validate_suites(cfg: EvalConfig) -> None:
    """eval.suite names and the absorption suite's ranges (before the LM loads)."""
    for name in cfg.suite:
        _choice("eval.suite", name, SUITE_NAMES)
    if cfg.suite and importlib.util.find_spec("sklearn") is None:
        raise ConfigError(
            f"eval.suite={list(cfg.suite)} fits probes with scikit-learn, which is not installed: "
            "pip install saetrain[eval]"
        )
    a = cfg.absorption
    if a.max_words is not None and a.max_words < 10:
        raise ConfigError(f"eval.absorption.max_words={a.max_words} must be at least 10 (or null)")
    if not 0.0 < a.train_fraction < 1.0:
        raise ConfigError(f"eval.absorption.train_fraction={a.train_fraction} must be in (0, 1)")
    if "{word}" not in a.prompt_template:
        raise ConfigError(
            f"eval.absorption.prompt_template={a.prompt_template!r} must contain {{word}}"
        )
    if a.position is not None and a.position >= 0:
        raise ConfigError(
            f"eval.absorption.position={a.position} must be negative (counted from the prompt's "
            "end, -1 is its last token) or null (the word's token)"
        )
    for name, value in [("icl_examples", a.icl_examples), ("max_k", a.max_k),
                        ("min_letters", a.min_letters), ("batch_prompts", a.batch_prompts),
                        ("l1_C", a.l1_C)]:  # fmt: skip
        _positive(f"eval.absorption.{name}", value, allow_zero=name == "icl_examples")
    if not 0.0 <= a.min_probe_f1 < 1.0:
        raise ConfigError(f"eval.absorption.min_probe_f1={a.min_probe_f1} must be in [0, 1)")
    if a.min_letters > 26:
        raise ConfigError(f"eval.absorption.min_letters={a.min_letters} must be at most 26")
    _positive("eval.absorption.f1_jump_threshold", a.f1_jump_threshold, allow_zero=True)


def validate(cfg: Config) -> None:
    """Check choices and ranges that the types alone cannot express (every dictionary's too)."""
    _validate_one(cfg)
    _positive("inspect.n_tokens", cfg.inspect.n_tokens)
    _positive("inspect.top_k", cfg.inspect.top_k)
    _choice("inspect.features", cfg.inspect.features, ("auto", "always", "never"))
    check_sparse_probing(cfg.eval.sparse_probing)
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


def check_sparse_probing(sp: SparseProbingConfig) -> None:
    """Ranges and task entries of eval.sparse_probing, before any model or data is read."""
    where = "eval.sparse_probing"
    for name in ("contexts_per_class", "context_length", "batch_contexts"):
        _positive(f"{where}.{name}", getattr(sp, name))
    if sp.context_length < 2:
        raise ConfigError(f"{where}.context_length={sp.context_length} must be at least 2")
    if not 0.0 < sp.test_fraction < 1.0:
        raise ConfigError(f"{where}.test_fraction={sp.test_fraction} must be in (0, 1)")
    if (
        round(sp.contexts_per_class * sp.test_fraction) < 1
        or round(sp.contexts_per_class * (1 - sp.test_fraction)) < 2
    ):
        raise ConfigError(
            f"{where}.contexts_per_class={sp.contexts_per_class} with test_fraction="
            f"{sp.test_fraction} leaves no test context or fewer than 2 train contexts per class"
        )
    if not sp.k_values or any(k < 1 for k in sp.k_values):
        raise ConfigError(f"{where}.k_values={list(sp.k_values)} must be positive integers")
    if not sp.tasks:
        raise ConfigError(f"{where}.tasks is empty; name at least one task")
    for i, entry in enumerate(sp.tasks):
        check_task_entry(entry, f"{where}.tasks[{i}]")


def _validate_one(cfg: Config) -> None:
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    _choice("buffer.dtype", cfg.buffer.dtype, DTYPES)
    _choice("dictionary.dtype", cfg.dictionary.dtype, DICTIONARY_DTYPES)
    _choice("dictionary.architecture", cfg.dictionary.architecture, tuple(ARCHITECTURES))
    _choice("dictionary.b_dec_init", cfg.dictionary.b_dec_init, B_DEC_INITS)
    if cfg.dictionary.encoder_init_norm is not None:
        _positive("dictionary.encoder_init_norm", cfg.dictionary.encoder_init_norm)
    _choice("logger.name", cfg.logger.name, LOGGERS)
    _choice("data.sample_by", cfg.data.sample_by, SAMPLE_BY)
    _choice("data.packing", cfg.data.packing, PACKINGS)
    if cfg.buffer.prefetch_batches is not None:
        _positive("buffer.prefetch_batches", cfg.buffer.prefetch_batches, allow_zero=True)
    _positive("cache.shard_tokens", cfg.cache.shard_tokens)
    _positive("checkpoint.every_tokens", cfg.checkpoint.every_tokens, allow_zero=True)
    _positive("checkpoint.keep_last", cfg.checkpoint.keep_last)
    _positive("distributed.timeout_s", cfg.distributed.timeout_s)
    _choice("distributed.assign", cfg.distributed.assign, ("balanced", "round_robin"))
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
        _positive(name, value)
    _validate_suites(cfg.eval)
    if not 0.0 < cfg.data.holdout_percent < 100.0:
        raise ConfigError(f"data.holdout_percent={cfg.data.holdout_percent} must be in (0, 100)")
    if cfg.data.context_size < 2:
        raise ConfigError(f"data.context_size={cfg.data.context_size} must be at least 2")
    if cfg.dictionary.n_latents is not None:
        _positive("dictionary.n_latents", cfg.dictionary.n_latents)
        if cfg.dictionary.k > cfg.dictionary.n_latents:
            raise ConfigError(
                f"dictionary.k={cfg.dictionary.k} exceeds dictionary.n_latents="
                f"{cfg.dictionary.n_latents}"
            )
    if cfg.dictionary.aux_k is not None:
        _positive("dictionary.aux_k", cfg.dictionary.aux_k)
    _positive("dictionary.aux_k_coefficient", cfg.dictionary.aux_k_coefficient, allow_zero=True)
    if cfg.trainer.lr is not None:
        _positive("trainer.lr", cfg.trainer.lr)
    _positive("trainer.warmup_steps", cfg.trainer.warmup_steps, allow_zero=True)
    _positive("trainer.adam_eps", cfg.trainer.adam_eps)
    for name in ("adam_beta1", "adam_beta2"):
        beta = getattr(cfg.trainer, name)
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"trainer.{name}={beta} must be in [0, 1)")
    _positive("trainer.grad_clip", cfg.trainer.grad_clip, allow_zero=True)
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
    check_cross_layer(cfg.dictionary)
    _positive("dictionary.sparsity_coefficient", cfg.dictionary.sparsity_coefficient, True)
    _positive("dictionary.jumprelu_bandwidth", cfg.dictionary.jumprelu_bandwidth)
    _positive("dictionary.jumprelu_init_threshold", cfg.dictionary.jumprelu_init_threshold)
    d = cfg.dictionary
    _choice("dictionary.aux_k_normalization", d.aux_k_normalization, AUX_K_NORMALIZATIONS)
    _choice("dictionary.matryoshka_reduction", d.matryoshka_reduction, MATRYOSHKA_REDUCTIONS)
    _choice("dictionary.jumprelu_sparsity_loss", d.jumprelu_sparsity_loss, SPARSITY_LOSSES)
    _choice("dictionary.jumprelu_pre_act_latents", d.jumprelu_pre_act_latents, PRE_ACT_LATENTS)
    _positive("dictionary.jumprelu_tanh_scale", d.jumprelu_tanh_scale)
    _positive("dictionary.jumprelu_pre_act_coefficient", d.jumprelu_pre_act_coefficient, True)
    _positive("trainer.target_l0_gain", cfg.trainer.target_l0_gain)
    if d.target_l0 is not None:
        if d.architecture not in ("relu", "gated", "jumprelu"):
            raise ConfigError(
                f"dictionary.target_l0={d.target_l0} applies to the penalty architectures (relu, "
                f"gated, jumprelu); dictionary.architecture={d.architecture!r} sets its L0 with "
                "dictionary.k"
            )
        _positive("dictionary.target_l0", d.target_l0)
        # A CLT's L0 is summed over its layers, its n_latents counts one layer's.
        layers = len(cfg.site.layers) if cfg.site.layers is not None else None
        if d.kind != "clt" and d.n_latents is not None and d.target_l0 > d.n_latents:
            raise ConfigError(
                f"dictionary.target_l0={d.target_l0} exceeds dictionary.n_latents={d.n_latents}"
            )
        if d.kind == "clt" and d.n_latents is not None and layers is not None:
            if d.target_l0 > d.n_latents * layers:
                raise ConfigError(
                    f"dictionary.target_l0={d.target_l0} exceeds the CLT's latents: "
                    f"dictionary.n_latents={d.n_latents} per layer × {layers} layers"
                )
    if d.jumprelu_sparsity_loss == "quadratic" and d.target_l0 is None:
        raise ConfigError(
            "dictionary.jumprelu_sparsity_loss=quadratic is quadratic around a target L0: set "
            "dictionary.target_l0"
        )
    _positive("trainer.sparsity_warmup_steps", cfg.trainer.sparsity_warmup_steps, True)
    if not 0.0 <= cfg.dictionary.threshold_momentum < 1.0:
        raise ConfigError(
            f"dictionary.threshold_momentum={cfg.dictionary.threshold_momentum} must be in [0, 1)"
        )
    prefixes = cfg.dictionary.matryoshka_prefixes
    if prefixes and cfg.dictionary.architecture != "matryoshka":
        raise ConfigError(
            f"dictionary.matryoshka_prefixes={list(prefixes)} only applies to "
            f"dictionary.architecture=matryoshka, not {cfg.dictionary.architecture!r}"
        )
    if prefixes:
        if list(prefixes) != sorted(set(prefixes)) or prefixes[0] < 1:
            raise ConfigError(
                f"dictionary.matryoshka_prefixes={list(prefixes)} must be strictly increasing "
                "positive sizes"
            )
        if cfg.dictionary.n_latents is not None and prefixes[-1] != cfg.dictionary.n_latents:
            raise ConfigError(
                f"dictionary.matryoshka_prefixes must end with dictionary.n_latents="
                f"{cfg.dictionary.n_latents}, got {list(prefixes)}"
            )


def _check_init_from(cfg: Config) -> None:
    """dictionary.init_from: what a run can start from a folder (its contents: preflight)."""
    folder = cfg.dictionary.init_from
    if folder is None:
        return
    where = f"dictionary.init_from={folder!r}"
    if not folder.strip():
        raise ConfigError(f"{where} is empty; name a dictionary folder, or null for a new one")
    if cfg.dictionary.kind != "single":
        raise ConfigError(
            f"{where}: a run starts from a folder's SAE or transcoder (dictionary.kind=single), "
            f"not dictionary.kind={cfg.dictionary.kind!r}"
        )
    if has_pattern(cfg.site):
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


def to_config(node: Any) -> Config:
    """Turn a composed DictConfig into the typed `Config`, refuse unknown keys, validate it."""
    check_known_keys(node)
    cfg = OmegaConf.to_object(node) if not isinstance(node, Config) else node
    if not isinstance(cfg, Config):
        raise ConfigError(f"expected a saetrain Config, got {type(cfg).__name__}")
    cfg = canonical_sites(cfg)
    validate(cfg)
    return cfg
