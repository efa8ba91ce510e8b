"""Build everything a config names, check it, train, evaluate, and write the run directory."""

from __future__ import annotations

import inspect
import json
import logging
import os
import secrets
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from eblvm.bilevel.ema import ParameterEMA
from eblvm.bilevel.module import BilevelModule, EvalConfig
from eblvm.bilevel.optim import OptimConfig
from eblvm.checkpoints import AtomicCheckpointIO, last_checkpoint, verify_checkpoint
from eblvm.errors import ConfigError, require, require_choice
from eblvm.evaluation.images import linear_probe
from eblvm.evaluation.plots import plot_density, plot_samples
from eblvm.models.grbm import GRBM
from eblvm.preemption import PreemptionCheckpoint
from eblvm.sampling.draw import SamplingConfig, draw_samples

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id"

# Notices that do not apply here: data are in-memory tensors (no workers needed), and deprecations inside
# Lightning and torchdata themselves.
for message in (
    ".*does not have many workers.*",
    ".*'set_vital' is deprecated.*",
    ".*isinstance\\(treespec, LeafSpec\\).*",
):
    warnings.filterwarnings("ignore", message=message)


def build(group: str, node: DictConfig, **runtime: Any) -> Any:
    """``instantiate(node)`` passing only the ``runtime`` arguments its target accepts.

    A ``ConfigError`` raised by a constructor is re-raised with the group's prefix (``sigma`` → ``objective.sigma``)
    and Hydra's wrapper is removed from a missing-file error, so the user sees the message that names the fix.
    """
    accepted = inspect.signature(get_class(node._target_)).parameters
    check_unknown_keys(group, node, accepted)
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
    """``cls(**node)`` (or ``cls.from_dict(node)`` for nested ones) with errors named under ``group``."""
    values = OmegaConf.to_container(node, resolve=True)
    return build_check(group, getattr(cls, "from_dict", None) or (lambda fields: cls(**fields)), values)


def build_check(group: str, check, *args: Any) -> Any:
    """``check(*args)`` with a ``ConfigError`` re-raised under the config group's prefix."""
    try:
        return check(*args)
    except ConfigError as error:
        raise error.with_prefix(group) from None


def check_devices(trainer: DictConfig) -> None:
    """``trainer.devices`` must exist here: no more GPUs than are visible, no more CPU processes than cores."""
    accelerator, devices = str(trainer.get("accelerator", "auto")), trainer.get("devices", "auto")
    gpus = torch.cuda.device_count()
    if accelerator in ("gpu", "cuda"):
        require(gpus > 0, "trainer.accelerator", accelerator, "no GPU is visible on this machine: use trainer=cpu")
        available, what = gpus, "GPUs"
    elif accelerator == "cpu":
        available, what = os.cpu_count() or 1, "CPU cores"
    else:
        return
    count = len(devices) if isinstance(devices, ListConfig | list) else devices
    require(
        not isinstance(count, int) or count <= available,
        "trainer.devices",
        devices,
        f"this machine has {available} {what}: use at most {available} (or -1 for all of them)",
    )


def check_unknown_keys(group: str, node: DictConfig, parameters) -> None:
    """Every key of a ``_target_`` node must be one of its target's ``parameters``, so a misspelt key names itself."""
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(key for key in node if not key.startswith("_") and key not in parameters)
    if unknown:
        keys = ", ".join(name for name in parameters if name not in ("self", "v_dim", "image_shape", "model"))
        raise ConfigError(
            f"{group}.{unknown[0]}",
            node.get(unknown[0]),
            f"{node._target_.rsplit('.', 1)[-1]} takes no such key; its keys are {keys}",
        )


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


def _save_figures(module: BilevelModule, datamodule, sampling: SamplingConfig, seed: int, out: Path) -> dict:
    """GRBMs: the density (2-D data) and Gibbs samples. Deep energies: the sample grid the test drew."""
    model = module.model
    if module.image_shape is not None:
        grid = out / "samples" / f"test_step{module.global_step:07d}.png"
        return {"samples": grid} if grid.is_file() else {}
    if not isinstance(model, GRBM):
        return {}
    generator = torch.Generator(device=model.W.device).manual_seed(seed)
    train = datamodule.splits.train
    figures = {}
    if datamodule.dim == 2:
        log_z = module.evaluation.log_partition(model, generator)
        figures["density"] = plot_density(model, log_z.value, train, out / "density.png")
    # 2-D: draws of v show the density; images: E[v|h], the papers' sample figures.
    samples = draw_samples(model, None, sampling, sampling.n_samples, generator, mean=datamodule.dim != 2)
    if datamodule.dim == 2 or datamodule.image_shape is not None:
        figures["samples"] = plot_samples(samples, train, out / "samples.png", datamodule.image_shape)
    return figures


@torch.no_grad()
def _linear_probe_accuracy(module: BilevelModule, datamodule) -> float | None:
    """Test accuracy of a logistic regression on q's means (METHODS §8); None without labels or a posterior."""
    posterior = module.posterior
    train_labels, test_labels = datamodule.labels("train"), datamodule.labels("test")
    if posterior is None or train_labels is None:
        return None

    def means(rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([posterior.mean(posterior(chunk.to(module.device))).cpu() for chunk in rows.split(1000)])

    return linear_probe(means(datamodule.train_data), train_labels, means(datamodule.splits.test), test_labels)


def resume_checkpoint(cfg: DictConfig, out: Path) -> Path | None:
    """The checkpoint to continue from: ``ckpt_path`` when given (it must exist), else with ``auto_resume`` the run
    directory's ``checkpoints/last.ckpt`` if there is one; checked to be complete before anything is built."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        require(path.is_file(), "ckpt_path", cfg.ckpt_path, "no such file: pass a <run>/checkpoints/*.ckpt file")
    elif cfg.get("auto_resume"):
        path = last_checkpoint(out)
        if not path.is_file():
            return None
    else:
        return None
    verify_checkpoint(path, key="ckpt_path")
    return path


def _instantiate_loggers(cfg: DictConfig, out: Path, resume_from: Path | None) -> list:
    """The configured loggers. A W&B run's id is kept in ``<run>/wandb_run_id``; a resumed run reuses the id of the
    run it continues, so the curves go on in the same W&B run."""
    loggers = []
    for node in (cfg.logger or {}).values():
        if get_class(node._target_) is not pl.loggers.WandbLogger:
            loggers.append(instantiate(node))
            continue
        earlier = resume_from.parent.parent / WANDB_ID_FILE if resume_from is not None else None
        # a new run: 8 random lowercase hex characters, the form of W&B's own run ids
        run_id = earlier.read_text().strip() if earlier is not None and earlier.is_file() else secrets.token_hex(4)
        (out / WANDB_ID_FILE).write_text(run_id)
        loggers.append(instantiate(node, id=run_id, resume="allow"))
    return loggers


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
    if "test/fid" in summary:
        lines.append(
            f"  test FID / KID       {summary['test/fid']:.2f} / {summary['test/kid_mean']:.4f} "
            f"({summary['sampling_mode']} samples, {summary['evaluated_weights']} weights)"
        )
    if "test/linear_probe_accuracy" in summary:
        lines.append(f"  linear probe on q   {summary['test/linear_probe_accuracy']:.4f} test accuracy")
    lines.append(f"  run directory        {output_dir}")
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate the configured model; returns the summary also written to ``summary.json``."""
    out = Path(cfg.paths.output_dir)
    require(int(cfg.trainer.max_steps) >= 1, "trainer.max_steps", cfg.trainer.max_steps, "must be >= 1")
    require_choice("test_checkpoint", cfg.test_checkpoint, ("best", "last"))
    check_devices(cfg.trainer)
    objective = build("objective", cfg.objective)
    optim = build_dataclass("optim", OptimConfig, cfg.optim)
    evaluation = build_dataclass("evaluation", EvalConfig, cfg.evaluation)
    sampling = build_dataclass("sampling", SamplingConfig, cfg.sampling)
    resume_from = resume_checkpoint(cfg, out)
    ema_decay = cfg.get("ema_decay")
    require(ema_decay is None or 0 < ema_decay < 1, "ema_decay", ema_decay, "must be null or in (0, 1), e.g. 0.999")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build("data", cfg.data)
    shapes = {"v_dim": datamodule.dim, "image_shape": datamodule.image_shape}
    model = build("model", cfg.model, **shapes)
    posterior = build("posterior", cfg.posterior, **shapes, model=model) if objective.needs_posterior else None
    check_pairing(model, posterior, objective)
    monitor = OmegaConf.select(cfg, "callbacks.checkpoint.monitor")
    require(
        monitor != "val/log_likelihood" or isinstance(model, GRBM),
        "callbacks.checkpoint.monitor",
        monitor,
        f"{type(model).__name__} has no log-likelihood: select checkpoints by the validation loss with "
        "callbacks.checkpoint.monitor=val/objective callbacks.checkpoint.mode=min",
    )
    is_grbm = isinstance(model, GRBM)
    sampling_mode = None if is_grbm else build_check("sampling", sampling.resolve_mode, model, posterior)
    objective.prepare(datamodule.train_data)

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    module = BilevelModule(
        model,
        posterior,
        objective,
        optim,
        evaluation,
        cfg.seed,
        sampling,
        image_shape=datamodule.image_shape,
        on_nonfinite=cfg.on_nonfinite,
        max_consecutive_skips=cfg.max_consecutive_skips,
    )
    loggers = _instantiate_loggers(cfg, out, resume_from)
    callbacks = [instantiate(node) for node in cfg.callbacks.values() if node is not None]
    callbacks.append(PreemptionCheckpoint(last_checkpoint(out)))
    if ema_decay is not None:  # validation, checkpoints' state_dict and the final test use the averaged weights
        callbacks.append(ParameterEMA(decay=ema_decay))
    weights = "raw" if ema_decay is None else f"EMA (decay {ema_decay})"
    for logger in loggers:
        logger.log_hyperparams({"evaluated_weights": weights, "sampling_mode": sampling_mode or "gibbs"})
    plugins = [*(instantiate(cfg.trainer.get("plugins")) or []), AtomicCheckpointIO()]
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=plugins)

    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    start = time.perf_counter()
    # eblvm's checkpoints hold numpy and Python random states besides tensors: loaded in full (weights_only=False)
    trainer.fit(module, datamodule, ckpt_path=resume_from, weights_only=False if resume_from else None)
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
    figures = _save_figures(module, datamodule, sampling, cfg.seed, out)
    probe_accuracy = _linear_probe_accuracy(module, datamodule)
    if probe_accuracy is not None:
        test_metrics["test/linear_probe_accuracy"] = probe_accuracy
        for logger in loggers:
            logger.log_metrics({"test/linear_probe_accuracy": probe_accuracy}, step=trainer.global_step)
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
        "evaluated_weights": weights,
        "sampling_mode": sampling_mode or "gibbs",
        "best_checkpoint": best,
        "last_checkpoint": str(last_checkpoint(out)) if best else "",
        **{name: float(value) for name, value in test_metrics.items()},
        **training_metrics,
        "figures": {name: str(path) for name, path in figures.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
