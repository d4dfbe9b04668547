"""`python -m saetrain.inspect path=<dictionary or run folder> [key=value ...]`.

Overrides are Hydra's, typed by `InspectConfig` (ConfigStore name `saetrain_inspect`); model.*
and data.* fields named on the command line replace the folder's settings, as in
`python -m saetrain.evaluate`. Exit code 0 on success, 2 on bad input (a message, no traceback).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from saetrain.inspect.pipeline import InspectConfig, InspectResult, inspect

CONFIG_NAME = "saetrain_inspect"

USAGE = """usage: python -m saetrain.inspect path=<dictionary folder | run folder> [key=value ...]

Runs the LM (to the site only) and the dictionary over held-out text and writes a static site
(open <path>/inspect/index.html from disk): every latent's top contexts, quantile samples,
frequency, activation histogram and logit effects, plus a dictionary-wide page. For transcoders
(one per layer) it also writes circuit-tracer's feature files (<path>/inspect/features/).
A run folder's dictionaries share one LM pass.
Keys: path, output_dir, seed, n_tokens, batch_contexts, top_k, window_before, window_after,
quantile_bands, per_band, logits_k, features (auto|always|never), dense_threshold, model.*,
data.* (see saetrain/inspect/pipeline.py's InspectConfig).
"""


def compose_config(overrides: Sequence[str]) -> tuple[InspectConfig, set[str]]:
    """Hydra-compose the schema with command-line overrides; also return the keys they set."""
    from hydra import compose, initialize
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from saetrain.config import check_known_keys

    ConfigStore.instance().store(name=CONFIG_NAME, node=InspectConfig)
    overrides = list(overrides)
    parsed = OverridesParser.create().parse_overrides(overrides)
    explicit = {o.key_or_group for o in parsed}
    GlobalHydra.instance().clear()
    with initialize(version_base=None, config_path=None):
        node = compose(config_name=CONFIG_NAME, overrides=overrides)
    check_known_keys(node, InspectConfig)
    cfg = OmegaConf.to_object(node)
    assert isinstance(cfg, InspectConfig)
    return cfg, explicit


def inspect_path(
    path: str, overrides: Sequence[str] = (), keep_records: bool = False
) -> InspectResult:
    """In-process equivalent of `python -m saetrain.inspect path=<path> <overrides>`
    (`keep_records`: every latent's record in the result too)."""
    cfg, explicit = compose_config([f"path={path}", *overrides])
    return inspect(cfg, explicit, keep_records=keep_records)


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 on success, 2 on bad input."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from saetrain.activations.sites import SiteError
    from saetrain.config import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    try:
        cfg, explicit = compose_config(argv)
        inspect(cfg, explicit)
    except (HydraException, OmegaConfBaseException, ConfigError, SiteError,
            FileNotFoundError) as e:  # fmt: skip
        print(f"saetrain.inspect: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    sys.exit(main())
