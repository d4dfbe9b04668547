"""The whole check of a config before anything loads: planning's field checks
(saetrain/planning/validate.py), each dictionary's own (saetrain/dictionaries/checks.py) and the
evaluation suites' (saetrain/evaluation/usefulness/checks.py). Above the components it asks, so
the CLI, the Python API and the run all call this one `validate` / `to_config`.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from saetrain.config import Config
from saetrain.dictionaries.checks import check_dictionary
from saetrain.errors import ConfigError
from saetrain.evaluation.usefulness.checks import check_sparse_probing, check_suites
from saetrain.planning.expand import canonical_sites, dictionary_configs
from saetrain.planning.keys import check_known_keys
from saetrain.planning.validate import validate_fields


def validate(cfg: Config) -> None:
    """Check choices and ranges that the types alone cannot express (every dictionary's too)."""
    validate_fields(cfg)
    check_suites(cfg.eval)
    check_sparse_probing(cfg.eval.sparse_probing)
    check_dictionary(cfg)
    if cfg.dictionaries:
        for i, (_, sub) in enumerate(dictionary_configs(cfg)):
            try:
                check_dictionary(sub)
            except ConfigError as e:
                raise ConfigError(f"dictionaries[{i}]: {e}") from None


def to_config(node: Any) -> Config:
    """Turn a composed DictConfig into the typed `Config`, refuse unknown keys, validate it."""
    check_known_keys(node)
    cfg = OmegaConf.to_object(node) if not isinstance(node, Config) else node
    if not isinstance(cfg, Config):
        raise ConfigError(f"expected a saetrain Config, got {type(cfg).__name__}")
    cfg = canonical_sites(cfg)
    validate(cfg)
    return cfg
