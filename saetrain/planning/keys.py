"""Unknown keys refused however they arrive (a `+key=value`, an experiment file, a `dictionaries`
entry): OmegaConf would drop them silently and the run would train with the key ignored."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from saetrain.config import Config, DictionaryConfig, DictionarySpec, SiteConfig, TrainerConfig
from saetrain.errors import ConfigError

# Fields typed `Any` whose mappings are overrides of a group: the schema their keys must follow.
_OVERRIDE_SCHEMAS: dict[str, type] = {
    "site": SiteConfig,
    "dictionary": DictionaryConfig,
    "trainer": TrainerConfig,
}


def _unknown_key(where: str, key: str, schema: type) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(schema)]
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(
        f"{where}{key}: unknown key {key!r}{hint} Valid keys of {where.rstrip('.') or 'the config'}"
        f": {', '.join(valid)}"
    )


def check_known_keys(node: Any, schema: type = Config, where: str = "") -> None:
    """Refuse any key the schema does not declare, however it arrived.

    OmegaConf's `to_object` silently drops keys that Hydra's `+key=value` (or an experiment file,
    or a `dictionaries` entry) added to a typed node, so a misspelt `+dictionary.kk=32` would
    train with the key ignored. This walks the composed node and names the first such key.
    """
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        node = OmegaConf.structured(node)
    if not isinstance(node, DictConfig):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        key = str(key)
        if key not in fields:
            raise _unknown_key(where, key, schema)
        value = node._get_node(key)
        sub_schema = _field_schema(schema, key)
        if isinstance(value, ListConfig) and sub_schema is not None:
            for i in range(len(value)):
                check_known_keys(value._get_node(i), sub_schema, f"{where}{key}[{i}].")
        elif isinstance(value, DictConfig) and sub_schema is not None:
            check_known_keys(value, sub_schema, f"{where}{key}.")


def _field_schema(schema: type, key: str) -> type | None:
    """The dataclass a field's mapping (or its list's items) must follow, if any."""
    if schema is DictionarySpec:
        return _OVERRIDE_SCHEMAS.get(key)
    if schema is Config and key == "dictionaries":
        return DictionarySpec
    default = {f.name: f for f in dataclasses.fields(schema)}[key].default_factory
    if default is not dataclasses.MISSING:
        made = default()
        if dataclasses.is_dataclass(made):
            return type(made)
    return None
