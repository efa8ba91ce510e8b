"""Build everything a config names, check it, train, evaluate, and write the run directory."""

from __future__ import annotations

import inspect
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from eblvm.bilevel.module import BilevelModule, EvalConfig
from eblvm.bilevel.optim import OptimConfig
from eblvm.errors import ConfigError, require, require_choice
from eblvm.evaluation.plots import plot_density, plot_samples
from eblvm.models.grbm import GRBM
from eblvm.sampling.gibbs import gibbs_sample

log = logging.getLogger(__name__)

# Lightning notices that do not apply here: data are in-memory tensors (no workers needed), the CSV logger shares
# the run directory with Hydra's files on purpose (it only replaces its own metrics.csv), and a deprecation inside
# Lightning itself.
for message in (
    ".*does not have many workers.*",
    "Experiment logs directory .* exists and is not empty.*",
    ".*isinstance\\(treespec, LeafSpec\\).*",
):
    warnings.filterwarnings("ignore", message=message)


def build(group: str, node: DictConfig, **runtime: Any) -> Any:
    """``instantiate(node)`` passing only the ``runtime`` arguments its target accepts.

    A ``ConfigError`` raised by a constructor is re-raised with the group's prefix (``sigma`` → ``objective.sigma``)
    and Hydra's wrapper is removed from a missing-file error, so the user sees the message that names the fix.
    """
    accepted = inspect.signature(get_class(node._target_)).parameters
    try:
        return instantiate(node, **{k: v for k, v in runtime.items() if k in accepted})
    except InstantiationException as wrapper:
        cause = wrapper.__cause__
        if isinstance(cause, ConfigError):
            raise cause.with_prefix(group) from None
        if isinstance(cause, FileNotFoundError | ValueError):
            raise cause from None
        raise


def build_dataclass(group: str, cls: type, node: DictConfig) -> Any:
    values = OmegaConf.to_container(node, resolve=True)
    try:
        return cls(**values)
    except ConfigError as error:
        raise error.with_prefix(group) from None


def check_pairing(model, posterior, objective) -> None:
    """Cross-group checks: latent sizes and types agree, and the objective can use this model."""
    if objective.needs_posterior:
        require(
            posterior.h_dim == model.h_dim,
            "posterior.h_dim",
            posterior.h_dim,
            f"must equal model.h_dim={model.h_dim}",
        )
        require(
            posterior.latent_type == model.latent_type,
            "posterior",
            type(posterior).__name__,
            f"has {posterior.latent_type} latents but {type(model).__name__} has {model.latent_type} ones",
        )
    objective.check_model(model, posterior.latent_type if posterior is not None else None)


def _save_figures(module: BilevelModule, datamodule, cfg: DictConfig, out: Path) -> dict[str, Path]:
    """Density (2-D data) and Gibbs-samples figures for GRBMs; nothing for models without a Gibbs sampler."""
    model = module.model
    if not isinstance(model, GRBM):
        return {}
    generator = torch.Generator(device=model.W.device).manual_seed(cfg.seed)
    train = datamodule.splits.train
    figures = {}
    if datamodule.dim == 2:
        log_z = module.evaluation.log_partition(model, generator)
        figures["density"] = plot_density(model, log_z.value, train, out / "density.png")
    # 2-D: draws of v show the density; images: E[v|h], the papers' sample figures.
    samples = gibbs_sample(
        model, cfg.plots.n_samples, cfg.plots.gibbs_sweeps, generator, return_mean=datamodule.dim != 2
    )
    image_shape = getattr(datamodule, "image_shape", None)
    if datamodule.dim == 2 or image_shape is not None:
        figures["samples"] = plot_samples(samples, train, out / "samples.png", image_shape)
    return figures


def _log_z_method(model, evaluation: EvalConfig) -> str | None:
    if not isinstance(model, GRBM):
        return None
    if model.h_dim <= evaluation.exact_max_h_dim:
        return "exact"
    return f"AIS ({evaluation.ais_temperatures} temperatures, {evaluation.ais_chains} chains)"


def format_summary(summary: dict[str, Any], output_dir: str) -> str:
    """The lines ``train.py`` prints at the end of a run."""
    lines = [
        f"trained {summary['steps']} steps in {summary['train_seconds']:.1f} s ({summary['ms_per_step']:.2f} ms/step)"
    ]
    if "test/log_likelihood" in summary:
        lines.append(
            f"  test log-likelihood  {summary['test/log_likelihood']:.4f} nats/point ({summary['log_z']} log Z)"
        )
    if "test/sm_objective" in summary:
        lines.append(f"  test SM objective    {summary['test/sm_objective']:.4f}")
    lines.append(f"  test objective       {summary['test/objective']:.4f}")
    lines.append(f"  run directory        {output_dir}")
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate the configured model; returns the summary also written to ``summary.json``."""
    out = Path(cfg.paths.output_dir)
    require(int(cfg.trainer.max_steps) >= 1, "trainer.max_steps", cfg.trainer.max_steps, "must be >= 1")
    require_choice("test_checkpoint", cfg.test_checkpoint, ("best", "last"))
    objective = build("objective", cfg.objective)
    optim = build_dataclass("optim", OptimConfig, cfg.optim)
    evaluation = build_dataclass("evaluation", EvalConfig, cfg.evaluation)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build("data", cfg.data)
    model = build("model", cfg.model, v_dim=datamodule.dim)
    posterior = build("posterior", cfg.posterior, v_dim=datamodule.dim, model=model)
    check_pairing(model, posterior, objective)
    objective.prepare(datamodule.train_data)

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    module = BilevelModule(model, posterior, objective, optim, evaluation, seed=cfg.seed)
    loggers = [instantiate(node) for node in (cfg.logger or {}).values()]
    callbacks = [instantiate(node) for node in cfg.callbacks.values()]
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)

    start = time.perf_counter()
    trainer.fit(module, datamodule)
    train_seconds = time.perf_counter() - start
    # the last validation's values of the metrics measured during training only (test replaces callback_metrics)
    training_metrics = {
        name: float(value)
        for name, value in trainer.callback_metrics.items()
        if name.startswith("val/gradient_bias") or name == "train/seconds_per_1000_steps"
    }
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best and cfg.test_checkpoint == "best":  # "last": the module already holds the final weights
        module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
    (test_metrics,) = trainer.test(module, datamodule, verbose=False)
    figures = _save_figures(module, datamodule, cfg, out)
    for logger in loggers:
        if isinstance(logger, pl.loggers.WandbLogger):
            for name, path in figures.items():
                logger.log_image(f"figures/{name}", [str(path)])

    summary = {
        "model": cfg.get("run_name"),
        "steps": trainer.global_step,
        "train_seconds": round(train_seconds, 2),
        "ms_per_step": round(1000 * train_seconds / max(trainer.global_step, 1), 3),
        "log_z": _log_z_method(model, evaluation),
        "tested": "best checkpoint" if best and cfg.test_checkpoint == "best" else "final weights",
        "best_checkpoint": best,
        "last_checkpoint": str(out / "checkpoints" / "last.ckpt") if best else "",
        **{name: float(value) for name, value in test_metrics.items()},
        **training_metrics,
        "figures": {name: str(path) for name, path in figures.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
