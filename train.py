"""Train an energy-based latent variable model: ``python train.py model=grbm objective=bism``."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from eblvm.errors import ConfigError, DivergenceError
from eblvm.run import format_summary, run

log = logging.getLogger("eblvm")

EXIT_CONFIG_ERROR = 2
EXIT_DIVERGED = 3


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = run(cfg)
    except (ConfigError, FileNotFoundError) as error:
        log.error("invalid configuration: %s", error)
        sys.exit(EXIT_CONFIG_ERROR)
    except DivergenceError as error:
        log.error("%s; the last finite checkpoint is kept in %s/checkpoints", error, cfg.paths.output_dir)
        sys.exit(EXIT_DIVERGED)
    finally:
        if "wandb" in sys.modules:
            sys.modules["wandb"].finish()
    print(format_summary(summary, cfg.paths.output_dir), flush=True)
    return summary.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
