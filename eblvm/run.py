"""Train and evaluate the run a config describes, and write its run directory."""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from hydra.utils import get_object
from lightning_fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from eblvm.assemble import RunParts, assemble, check_run_settings, instantiate_node, saved_config
from eblvm.atomic import write_json, write_text
from eblvm.callbacks import EvaluationCallback, LastCheckpoint, ParameterEMA
from eblvm.checkpoints import CheckpointIO, last_checkpoint, load_checkpoint
from eblvm.errors import ConfigError, require

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id"
RESUME_CHANGES_FILE = "resume_changes.yaml"
RESUME_KEYS = ("ckpt_path", "auto_resume")
# Config keys that may differ when a run is resumed, because they cannot change the trained trajectory (paths and
# logging, the length of the run, and evaluation, which draws from generators of its own); a key matches an entry
# equal to it or an entry ending in "." that it starts with.
RESUMABLE_CHANGES = (
    "trainer.max_steps",
    "trainer.val_check_interval",
    "trainer.limit_val_batches",
    "trainer.limit_test_batches",
    "trainer.log_every_n_steps",
    "trainer.default_root_dir",
    "trainer.profiler",
    "trainer.enable_progress_bar",
    "data.eval_batch_size",
    "test_checkpoint",
    "run_name",
    "optimized_metric",
    "paths.",
    "hydra.",
    "logger.",
    "launcher.",
    "evaluation.",
    "sampling.",
    "callbacks.",
)


def resume_checkpoint(cfg: DictConfig, out: Path) -> Path | None:
    """The checkpoint to continue from: ``ckpt_path`` when given (it must exist), else with ``auto_resume`` the run
    directory's ``checkpoints/last.ckpt`` if there is one."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        require(path.is_file(), "ckpt_path", cfg.ckpt_path, "no such file: pass a <run>/checkpoints/*.ckpt file")
        return path
    if cfg.get("auto_resume") and last_checkpoint(out).is_file():
        return last_checkpoint(out)
    return None


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        return {key: value for k, child in node.items() for key, value in _flatten(child, f"{prefix}{k}.").items()}
    return {prefix.rstrip("."): node}


def config_changes(saved: DictConfig, current: DictConfig) -> dict[str, dict[str, Any]]:
    """Every dotted key whose value differs between two resolved configs: ``{key: {"saved": …, "now": …}}``."""
    before = _flatten(OmegaConf.to_container(saved, resolve=True))
    after = _flatten(OmegaConf.to_container(current, resolve=True))
    return {
        key: {"saved": before.get(key), "now": after.get(key)}
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    }


def _resumable(key: str) -> bool:
    return any(key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in RESUMABLE_CHANGES)


def check_resume(cfg: DictConfig, resume_from: Path, out: Path) -> None:
    """Refuse to continue ``resume_from`` under a config that would change the trained trajectory, naming the keys
    that differ; record the changes that may differ in ``<run>/resume_changes.yaml``."""
    saved, _ = saved_config(load_checkpoint(resume_from, key="ckpt_path"), resume_from)
    # how to resume is not a change of the run (``resumed_from`` records the file)
    changes = {key: change for key, change in config_changes(saved, cfg).items() if key not in RESUME_KEYS}
    blocking = [key for key in changes if not _resumable(key)]
    if "trainer.max_steps" in changes and cfg.optim.scheduler == "cosine":
        blocking.append("trainer.max_steps")  # the cosine schedule anneals over max_steps: its length is the run's
    if blocking:
        shown = "; ".join(f"{key}: {changes[key]['saved']!r} → {changes[key]['now']!r}" for key in blocking[:8])
        raise ConfigError(
            "ckpt_path" if cfg.get("ckpt_path") else "auto_resume",
            str(resume_from),
            f"was trained with other settings, and continuing would change the run: {shown}. Resume with the "
            "saved settings, or start a new run",
        )
    if changes:
        history_file = out / RESUME_CHANGES_FILE
        history = (yaml.safe_load(history_file.read_text()) or []) if history_file.is_file() else []
        history.append({"resumed_from": str(resume_from), "changes": changes})
        write_text(history_file, yaml.safe_dump(history, sort_keys=False))


def wandb_run_id(log_dir: Path, out: Path, resume_from: Path | None) -> str:
    """The W&B run id of the run logged from ``log_dir`` (the run directory, or an ensemble member's), kept in
    ``<log_dir>/wandb_run_id``: a run resumed from a checkpoint inside its own run directory ``out`` reuses it, so
    the curves go on in the same W&B run; a new run, or one started from another run's checkpoint, gets a new one
    (8 random lowercase hex characters, the form of W&B's own ids). Only rank 0, whose W&B run is the one that
    logs, writes the file: every DDP rank builds its loggers."""
    earlier = log_dir / WANDB_ID_FILE
    own_run = resume_from is not None and resume_from.resolve().is_relative_to(out.resolve())
    run_id = earlier.read_text().strip() if own_run and earlier.is_file() else secrets.token_hex(4)
    if rank_zero_only.rank == 0:
        write_text(earlier, run_id)
    return run_id


def is_wandb(node: DictConfig) -> bool:
    """Whether a ``logger`` config node builds a W&B logger."""
    return get_object(node._target_) is pl.loggers.WandbLogger


def wandb_logger(key: str, node: DictConfig, log_dir: Path, out: Path, resume_from: Path | None, **kwargs):
    """The W&B logger ``node`` builds for the run logged from ``log_dir``, under its kept id (``wandb_run_id``);
    Lightning's logger resumes a W&B run of that id when one exists (``resume="allow"``)."""
    return instantiate_node(key, node, id=wandb_run_id(log_dir, out, resume_from), **kwargs)


def _instantiate_loggers(cfg: DictConfig, out: Path, resume_from: Path | None) -> list:
    """The configured loggers; a W&B run keeps its id across resumes (``wandb_run_id``)."""
    return [
        wandb_logger(f"logger.{name}", node, out, out, resume_from)
        if is_wandb(node)
        else instantiate_node(f"logger.{name}", node)
        for name, node in (cfg.logger or {}).items()
    ]


def _lightning_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The configured callbacks other than evaluation ones (checkpointing, the progress bar)."""
    return [
        instantiate_node(f"callbacks.{name}", node)
        for name, node in cfg.callbacks.items()
        if node is not None and not issubclass(get_object(node._target_), EvaluationCallback)
    ]


def format_summary(summary: dict[str, Any], output_dir: str) -> str:
    """The lines ``train.py`` prints at the end of a run."""
    lines = [
        f"trained {summary['steps']} steps in {summary['train_seconds']:.1f} s ({summary['ms_per_step']:.2f} ms/step)"
    ]
    if "test/log_likelihood" in summary:
        stderr = summary.get("test/log_likelihood_stderr", 0.0)
        error = f" ± {stderr:.4f}" if stderr else ""
        lines.append(
            f"  test log-likelihood  {summary['test/log_likelihood']:.4f}{error} nats/point ({summary['log_z']} log Z)"
        )
    if "test/sm_objective" in summary:
        lines.append(f"  test SM objective    {summary['test/sm_objective']:.4f}")
    if "test/posterior_gap" in summary:
        lines.append(f"  test posterior gap   {summary['test/posterior_gap']:.4f} nats (KL of q to the posterior)")
    lines.append(f"  test objective       {summary['test/objective']:.4f}")
    if "test/fid" in summary:
        lines.append(
            f"  test FID / KID       {summary['test/fid']:.2f} / {summary['test/kid_mean']:.4f} "
            f"({summary['sampling_mode']} samples, {summary['evaluated_weights']} weights)"
        )
    if "test/reconstruction_mse_per_pixel" in summary:
        lines.append(
            f"  test reconstruction  {summary['test/reconstruction_mse_per_pixel']:.4f} squared error per pixel, "
            f"{summary['test/reconstruction_sse_per_image']:.2f} per image ({summary['network_mode']} mode)"
        )
    aurocs = {key.removeprefix("test/auroc_"): value for key, value in summary.items() if key.startswith("test/auroc_")}
    if aurocs:
        listed = ", ".join(f"{name} {value:.4f}" for name, value in aurocs.items())
        lines.append(f"  test OOD AUROC       {listed} (score -F)")
    if "test/linear_probe_accuracy" in summary:
        lines.append(f"  linear probe on q   {summary['test/linear_probe_accuracy']:.4f} test accuracy")
    lines.append(f"  run directory        {output_dir}")
    return "\n".join(lines)


def training_only_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The last validation's values of the metrics measured during training only (a test replaces
    ``callback_metrics``)."""
    return {
        name: float(value)
        for name, value in trainer.callback_metrics.items()
        if name.startswith("val/gradient_bias") or name == "train/seconds_per_1000_steps"
    }


def summarize(parts: RunParts, cfg: DictConfig, metrics: dict[str, float], **facts: Any) -> dict[str, Any]:
    """``summary.json``: the run's facts, what its evaluation callbacks recorded and the ``metrics``."""
    return {
        "model": cfg.get("run_name"),
        **facts,
        **parts.evaluation_record(),
        **{name: float(value) for name, value in metrics.items()},
    }


def checked_start(cfg: DictConfig) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to continue from, once the run's settings (and, when it resumes, the
    saved config) are checked: before anything is built."""
    out = Path(cfg.paths.output_dir)
    check_run_settings(cfg)
    resume_from = resume_checkpoint(cfg, out)
    if resume_from is not None:
        check_resume(cfg, resume_from, out)
    return out, resume_from


def write_config(cfg: DictConfig, out: Path) -> None:
    """``<out>/config.yaml``: the resolved config of the run that writes ``out``."""
    write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate the configured model; returns the summary also written to ``summary.json``."""
    out, resume_from = checked_start(cfg)
    parts = assemble(cfg)
    write_config(cfg, out)
    module = parts.module(cfg)
    loggers = _instantiate_loggers(cfg, out, resume_from)
    callbacks = [*_lightning_callbacks(cfg), *parts.evaluation_callbacks, LastCheckpoint(last_checkpoint(out))]
    ema_decay = cfg.get("ema_decay")
    if ema_decay is not None:  # validation, checkpoints' state_dict and the final test use the averaged weights
        callbacks.append(ParameterEMA(decay=ema_decay))
    weights = "raw" if ema_decay is None else f"EMA (decay {ema_decay})"
    for logger in loggers:
        logger.log_hyperparams({"evaluated_weights": weights, "sampling_mode": parts.sampling_mode})
    configured_plugins = cfg.trainer.get("plugins") or []
    plugins = [*(instantiate_node(f"trainer.plugins[{i}]", node) for i, node in enumerate(configured_plugins))]
    trainer: pl.Trainer = instantiate_node(
        "trainer", cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=[*plugins, CheckpointIO()]
    )

    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    start = time.perf_counter()
    trainer.fit(module, parts.datamodule, ckpt_path=resume_from, weights_only=True if resume_from else None)
    train_seconds = time.perf_counter() - start
    training_metrics = training_only_metrics(trainer)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best and cfg.test_checkpoint == "best":  # "last": the module already holds the final weights
        module.load_state_dict(load_checkpoint(best)["state_dict"])
    (test_metrics,) = trainer.test(module, parts.datamodule, verbose=False)
    summary = summarize(
        parts,
        cfg,
        {**test_metrics, **training_metrics},
        steps=trainer.global_step,
        train_seconds=round(train_seconds, 2),
        ms_per_step=round(1000 * train_seconds / max(trainer.global_step, 1), 3),
        tested="best checkpoint" if best and cfg.test_checkpoint == "best" else "final weights",
        evaluated_weights=weights,
        best_checkpoint=best,
        last_checkpoint=str(last_checkpoint(out)) if last_checkpoint(out).is_file() else "",
    )
    write_json(out / "summary.json", summary)
    return summary
