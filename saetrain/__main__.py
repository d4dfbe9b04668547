"""`python -m saetrain [overrides]`: compose the Hydra config, then call run()."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from saetrain import config_dir
from saetrain.activations.cache import CacheError
from saetrain.activations.sites import SiteError
from saetrain.config import ConfigError, register_configs, to_config

register_configs()


@hydra.main(config_path=config_dir(), config_name="config", version_base=None)
def _main(node: DictConfig) -> dict[str, float]:
    from saetrain.run import run

    try:
        cfg = to_config(node)
        output_dir = cfg.output_dir or HydraConfig.get().runtime.output_dir
        return run(cfg, output_dir).metrics
    except (ConfigError, SiteError, CacheError, FileNotFoundError) as e:
        print(f"saetrain: error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
