"""`python -m saetrain [overrides]`: compose the Hydra config, then call run()."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from saetrain import config_dir
from saetrain.activations.cache import CacheError
from saetrain.activations.sites import SiteError
from saetrain.config import ConfigError, register_configs, to_config
from saetrain.export.hub import PublishError
from saetrain.training.checkpoint import TrainingDiverged, TrainingInterrupted

register_configs()


@hydra.main(config_path=config_dir(), config_name="config", version_base=None)
def _main(node: DictConfig) -> dict[str, float]:
    from saetrain.run import run

    try:
        cfg = to_config(node)
        hydra_dir = Path(HydraConfig.get().runtime.output_dir)
        output_dir = cfg.output_dir or hydra_dir
        # `resume=true` without output_dir looks for the newest run under outputs/ (run mode's
        # folders are outputs/<date>/<time>).
        outputs_root = hydra_dir.parents[1] if len(hydra_dir.parents) > 1 else None
        return run(cfg, output_dir, outputs_root).metrics
    except (ConfigError, SiteError, CacheError, FileNotFoundError) as e:
        print(f"saetrain: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (TrainingDiverged, TrainingInterrupted, PublishError) as e:
        print(f"saetrain: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("saetrain: interrupted (a second Ctrl-C: no checkpoint written)", file=sys.stderr)
        sys.exit(130)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
