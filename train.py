"""Train an energy-based latent variable model: ``python train.py model=grbm objective=bism``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning_fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

import eblvm.config  # noqa: F401  (registers the schema that conf/train.yaml names first)
from eblvm.atomic import write_json
from eblvm.ensemble import format_ensemble_summary, is_ensemble, run_ensemble
from eblvm.errors import ConfigError, DivergenceError, Preempted
from eblvm.run import format_summary, run

log = logging.getLogger("eblvm")

# Exit codes of a single run; a multirun job records its code in <job>/outcome.json, returns no value and the
# sweep goes on.
EXIT_FAILED = 1
EXIT_CONFIG_ERROR = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 4


def _outcome(error: BaseException | None, cfg: DictConfig) -> dict:
    """What ``outcome.json`` records for a run that ended with ``error`` (None: it finished)."""
    if error is None:
        return {"status": "ok", "exit_code": 0, "message": "", "step": None}
    if isinstance(error, ConfigError | FileNotFoundError):
        return {"status": "failed", "exit_code": EXIT_CONFIG_ERROR, "message": f"invalid configuration: {error}",
                "step": None}  # fmt: skip
    if isinstance(error, DivergenceError):
        message = f"{error}; the last finite checkpoint is kept in {cfg.paths.output_dir}/checkpoints"
        return {"status": "diverged", "exit_code": EXIT_DIVERGED, "message": message, "step": error.step}
    if isinstance(error, Preempted):
        message = f"{error}; continue with auto_resume=true (same run directory) or ckpt_path=<that file>"
        return {"status": "preempted", "exit_code": EXIT_PREEMPTED, "message": message, "step": error.step}
    return {"status": "failed", "exit_code": EXIT_FAILED, "message": f"{type(error).__name__}: {error}", "step": None}


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    summary, error = None, None
    try:
        summary = run_ensemble(cfg) if is_ensemble(cfg) else run(cfg)
    except (ConfigError, FileNotFoundError, DivergenceError, Preempted) as known:
        error = known
    except Exception as unexpected:
        if not multirun:
            raise
        log.exception("job failed")
        error = unexpected
    finally:
        if "wandb" in sys.modules:
            sys.modules["wandb"].finish()
    outcome = _outcome(error, cfg)
    if rank_zero_only.rank == 0:  # DDP launched as processes: every rank runs this, one writes
        write_json(Path(cfg.paths.output_dir) / "outcome.json", outcome)
    if error is not None:
        log.error(outcome["message"])
        if not multirun:
            sys.exit(outcome["exit_code"])
        return None  # sweepers record no value: Optuna marks the trial failed and the study goes on
    show = format_ensemble_summary if is_ensemble(cfg) else format_summary
    print(show(summary, cfg.paths.output_dir), flush=True)
    return summary.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
