"""`python -m saetrain.inspect path=<dictionary or run folder> [key=value ...]`.

Overrides are Hydra's, typed by `InspectConfig` (ConfigStore name `saetrain_inspect`); model.*
and data.* fields named on the command line replace the folder's settings, as in
`python -m saetrain.evaluate`. Exit code 0 on success, 2 on bad input (a message, no traceback).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from saetrain.folder_cli import compose_schema, folder_main
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
    return compose_schema(InspectConfig, CONFIG_NAME, overrides)


def inspect_path(
    path: str, overrides: Sequence[str] = (), keep_records: bool = False
) -> InspectResult:
    """In-process equivalent of `python -m saetrain.inspect path=<path> <overrides>`
    (`keep_records`: every latent's record in the result too)."""
    cfg, explicit = compose_config([f"path={path}", *overrides])
    return inspect(cfg, explicit, keep_records=keep_records)


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 on success, 2 on bad input."""
    return folder_main("saetrain.inspect", USAGE, argv, compose_config, inspect)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    sys.exit(main())
