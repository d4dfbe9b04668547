"""What the folder commands share (`python -m saetrain.evaluate`, `python -m saetrain.inspect`):
Hydra composition of their own schema with the keys the command line set, and the main that
turns bad input into exit code 2 with a message instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from hydra import compose, initialize
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from saetrain.errors import BAD_INPUT, EXIT_BAD_INPUT, EXIT_OK
from saetrain.planning.keys import check_known_keys

T = TypeVar("T")


def compose_schema(schema: type[T], name: str, overrides: Sequence[str]) -> tuple[T, set[str]]:
    """`schema` (a dataclass, stored in Hydra's ConfigStore as `name`) composed with the
    command-line overrides, unknown keys refused; also the keys the overrides set."""
    ConfigStore.instance().store(name=name, node=schema)
    overrides = list(overrides)
    parsed = OverridesParser.create().parse_overrides(overrides)
    explicit = {o.key_or_group for o in parsed}
    GlobalHydra.instance().clear()
    with initialize(version_base=None, config_path=None):
        node = compose(config_name=name, overrides=overrides)
    check_known_keys(node, schema)  # `+eval.n_tokenz=...` must not pass silently
    cfg = OmegaConf.to_object(node)
    assert isinstance(cfg, schema)
    return cfg, explicit


def folder_main(
    prog: str,
    usage: str,
    argv: list[str] | None,
    compose: Callable[[Sequence[str]], tuple[Any, set[str]]],
    act: Callable[[Any, set[str]], object],
) -> int:
    """The command: usage on -h/--help; 0 on success; 2 on bad input, with `prog: error: …`."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        return EXIT_OK
    try:
        cfg, explicit = compose(argv)
        act(cfg, explicit)
    except (HydraException, OmegaConfBaseException, *BAD_INPUT) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK
