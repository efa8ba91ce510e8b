"""Train S runs in one process: ``python train.py ensemble.size=S`` (docs/methods.md §9).

Member ``k`` is the run its config would be alone, ``seed = ensemble.seeds[k]`` (default ``seed + k``) and each
varied key at its ``k``-th value: it starts from the weights that seed draws, sees the batches that seed shuffles
and draws the noise that seed draws, so it ends where that run would (to float rounding). The members train as one
``EnsembleModule``; each is evaluated as a run of its own, through its own evaluation callbacks, at every
validation and at the end.

The run directory holds the ensemble's ``checkpoints/last.ckpt`` (resumable), ``metrics.csv`` with a ``member``
column and ``summary.json`` (every member's test metrics, their mean and standard deviation, masked members), and
``members/<k>/`` per member: ``config.yaml``, ``checkpoints/{last,best}.ckpt`` (ordinary checkpoints that
``python -m eblvm.sample``, ``python -m eblvm.evaluate`` and the studies read), its figures and ``summary.json``.
With W&B, each member is a W&B run of its own, grouped under the ensemble's ``run_name``.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from eblvm.aggregate import mean_and_stdev
from eblvm.assemble import RunParts, assemble, build_dataclass, instantiate_node
from eblvm.atomic import write_json
from eblvm.bilevel.ensemble import EnsembleModule
from eblvm.bilevel.optim import OptimConfig, member_learning_rates
from eblvm.callbacks import LastCheckpoint
from eblvm.checkpoints import FORMAT_VERSION, RECORD_KEY, CheckpointIO, last_checkpoint, load_checkpoint
from eblvm.errors import ConfigError, require, require_count
from eblvm.evaluate import evaluation_trainer
from eblvm.members import member_slice, stack, stack_parameters
from eblvm.run import (
    _lightning_callbacks,
    checked_start,
    is_wandb,
    summarize,
    training_only_metrics,
    wandb_logger,
    write_config,
)

# The settings members may differ in, besides their seeds: continuous ones the stacked step takes per member.
VARIABLE_KEYS = ("optim.lr", "optim.posterior_lr", "objective.sigma")
MEMBERS_DIR = "members"


@dataclass(frozen=True)
class EnsembleConfig:
    """``ensemble.*``: ``size`` runs at once (1: a single run), their ``seeds`` (None: ``seed, seed + 1, …``) and
    the settings that ``vary`` between them, a list of ``size`` values per key of ``VARIABLE_KEYS``."""

    size: int = 1
    seeds: list[int] | None = None
    vary: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self):
        require_count("ensemble.size", self.size, 1)
        require(
            self.size > 1 or (self.seeds is None and not self.vary),
            "ensemble.size",
            self.size,
            "is 1, so ensemble.seeds and ensemble.vary would be ignored: set ensemble.size to their length",
        )
        if self.seeds is not None:
            require(
                len(self.seeds) == self.size and len(set(self.seeds)) == self.size,
                "ensemble.seeds",
                list(self.seeds),
                f"must be {self.size} different seeds, one per member (ensemble.size={self.size})",
            )
        for key, values in self.vary.items():
            allowed = ", ".join(VARIABLE_KEYS)
            require(key in VARIABLE_KEYS, f"ensemble.vary.{key}", values, f"members may vary {allowed}")
            require(
                len(values) == self.size and all(isinstance(value, int | float) for value in values),
                f"ensemble.vary.{key}",
                list(values),
                f"must be {self.size} numbers, one per member (ensemble.size={self.size})",
            )

    @classmethod
    def of(cls, cfg: DictConfig) -> EnsembleConfig:
        node = OmegaConf.to_container(cfg.get("ensemble") or {}, resolve=True)
        vary = _flatten_vary(node.get("vary") or {})
        return cls(size=node.get("size", 1), seeds=node.get("seeds"), vary=vary)

    def member_seeds(self, seed: int) -> list[int]:
        return list(self.seeds) if self.seeds is not None else [seed + k for k in range(self.size)]


def _flatten_vary(node: dict, prefix: str = "") -> dict[str, list]:
    """``{optim: {lr: [...]}}`` (how Hydra nests ``ensemble.vary.optim.lr=[...]``) as ``{"optim.lr": [...]}``."""
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat |= _flatten_vary(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_ensemble(cfg: DictConfig) -> bool:
    """Whether ``cfg`` trains several runs at once."""
    return EnsembleConfig.of(cfg).size > 1


def member_config(cfg: DictConfig, ensemble: EnsembleConfig, member: int) -> DictConfig:
    """The config of member ``member`` as a run of its own (resolved): its seed, its values of the varied keys,
    ``ensemble.size=1`` and its own run directory ``<run>/members/<member>``."""
    # set before resolving, so that keys following these (posterior_lr, the loggers' and checkpoints' folders)
    # follow the member's values
    config = copy.deepcopy(cfg)
    config.seed = ensemble.member_seeds(cfg.seed)[member]
    for key, values in ensemble.vary.items():
        OmegaConf.update(config, key, values[member])
    config.run_name = f"{cfg.run_name}_member{member}"
    config.paths.output_dir = str(Path(cfg.paths.output_dir) / MEMBERS_DIR / str(member))
    config = OmegaConf.create(OmegaConf.to_container(config, resolve=True))
    config.ensemble = {"size": 1, "seeds": None, "vary": {}}
    config.ckpt_path, config.auto_resume = None, False
    return config


@dataclass
class EnsembleParts:
    """The members' parts (each built and seeded as its run alone), their configs and the module training them."""

    configs: list[DictConfig]
    members: list[RunParts]
    module: EnsembleModule
    datamodule: Any
    member_shapes: dict[str, torch.Size | None]

    def member_state(self, member: int) -> dict[str, torch.Tensor]:
        """Member ``member``'s state dict, in the names and shapes of a single run's."""
        state = {name: value.detach() for name, value in self.module.state_dict().items() if name != "active"}
        return member_slice(state, member, self.member_shapes)

    def member_posterior_optimizer(self, member: int, module: pl.LightningModule) -> torch.optim.Optimizer | None:
        """q's optimizer of member ``member`` for its single-run ``module``: the member's slice of the ensemble's
        optimizer state at the member's current learning rate (None when q has no weights or nothing trains)."""
        if not module.trains_posterior or self.module._trainer is None or len(self.module.trainer.optimizers) < 2:
            return None
        stacked = self.module.trainer.optimizers[1]
        group = stacked.param_groups[0]
        rates = member_learning_rates({**group, "member_mask": None})
        lr = float(rates[member]) if isinstance(rates, torch.Tensor) else rates
        optimizer = module.optim.optimizer(module.posterior.parameters(), lr, "posterior")
        for param, stacked_param in zip(module.posterior.parameters(), group["params"], strict=True):
            state = stacked.state.get(stacked_param)
            if state:
                optimizer.state[param] = {
                    key: value[member].reshape(param.shape).clone()
                    if isinstance(value, torch.Tensor) and value.dim()
                    else value
                    for key, value in state.items()
                }
        return optimizer

    def member_checkpoint(self, member: int) -> dict[str, Any]:
        """An ordinary checkpoint of member ``member`` (its weights, step and config)."""
        parts = self.members[member]
        return {
            "state_dict": self.member_state(member),
            "global_step": self.module.global_step,
            RECORD_KEY: {
                "format_version": FORMAT_VERSION,
                "config": OmegaConf.to_container(self.configs[member], resolve=True),
                "data_shapes": parts.data_shapes,
            },
            "eblvm_ensemble_member": {"member": member, "seed": self.module.seeds[member]},
        }


def _check_ensemble(cfg: DictConfig, ensemble: EnsembleConfig) -> None:
    """Refuse, before anything is built, what an ensemble cannot train."""
    model_class = get_object(cfg.model._target_)
    require(
        getattr(model_class, "member_broadcast", False) or bool(getattr(model_class, "member_methods", {})),
        "model",
        model_class.__name__,
        "trains only alone (no member_broadcast or member_methods): ensembles train e.g. model=grbm or "
        "model=gaussian_linear",
    )
    require(
        not OmegaConf.select(cfg, "data.random_flip", default=False),
        "data.random_flip",
        True,
        "flips image batches, and ensembles train vector models: use false",
    )
    devices = cfg.trainer.get("devices", 1)
    require(devices == 1, "trainer.devices", devices, "an ensemble trains in one process: use trainer.devices=1")
    require(cfg.get("ema_decay") is None, "ema_decay", cfg.get("ema_decay"), "ensembles train without EMA: use null")
    require(
        cfg.on_nonfinite == "stop",
        "on_nonfinite",
        cfg.on_nonfinite,
        "an ensemble masks non-finite members and stops when all are masked: use on_nonfinite=stop",
    )
    if "objective.sigma" in ensemble.vary:
        require(
            OmegaConf.select(cfg, "objective.higher") == "dsm",
            "ensemble.vary.objective.sigma",
            ensemble.vary["objective.sigma"],
            "varies DSM's noise level: it needs objective.higher=dsm",
        )


def assemble_ensemble(cfg: DictConfig) -> EnsembleParts:
    """Build every member as its run alone would be built (``assemble`` seeds each), then stack them."""
    ensemble = EnsembleConfig.of(cfg)
    _check_ensemble(cfg, ensemble)
    configs = [member_config(cfg, ensemble, k) for k in range(ensemble.size)]
    members = [assemble(config) for config in configs]
    first = members[0]
    for parts in members[1:]:
        require(
            torch.equal(parts.datamodule.train_data, first.datamodule.train_data),
            "ensemble.seeds",
            ensemble.member_seeds(cfg.seed),
            "give the members different training data, and an ensemble's members share theirs: fix data.*.seed",
        )
    model = stack([parts.model for parts in members])
    posterior = None
    if first.posterior is not None:
        if any(True for _ in first.posterior.parameters()):
            posterior = stack([parts.posterior for parts in members])
        else:  # a model's own posterior (no weights): built around the stacked model
            posterior = instantiate_node(
                "posterior", cfg.posterior, v_dim=first.data_shapes["v_dim"],
                image_shape=first.data_shapes["image_shape"], model=model,
            )  # fmt: skip
    objective = stack_parameters(copy.deepcopy(first.objective), [parts.objective for parts in members])
    if "objective.sigma" in ensemble.vary:
        objective.loss.sigma = torch.tensor(ensemble.vary["objective.sigma"], dtype=torch.float32)
    # the single-run shape of every stacked entry of the module's state (None: a member's slice as it is)
    member_shapes = {f"model.{name}": value.shape for name, value in first.model.state_dict().items()}
    if posterior is not None:
        member_shapes |= {f"posterior.{name}": value.shape for name, value in first.posterior.state_dict().items()}
    member_shapes |= {f"objective.{name}": value.shape for name, value in first.objective.named_parameters()}
    member_shapes |= {f"objective.{name}": None for name in objective.per_rank_buffers}
    seeds = ensemble.member_seeds(cfg.seed)
    optim = build_dataclass("optim", OptimConfig, cfg.optim)  # the configured rates, which members' scale
    record = {"config": OmegaConf.to_container(cfg, resolve=True), "data_shapes": first.data_shapes}
    module = EnsembleModule(
        model,
        posterior,
        objective,
        optim,
        cfg.seed,
        on_nonfinite=cfg.on_nonfinite,
        max_consecutive_skips=cfg.max_consecutive_skips,
        run_record=record,
        seeds=seeds,
        energy_rates=optim.member_rates("lr", [config.optim.lr for config in configs]),
        posterior_rates=optim.member_rates("posterior_lr", [config.optim.posterior_lr for config in configs]),
    )
    datamodule = copy.copy(first.datamodule)  # the ensemble's own (member 0 evaluates on the first one)
    datamodule.shuffle_seeds = seeds
    return EnsembleParts(configs, members, module, datamodule, member_shapes)


class MemberLog:
    """Each member's metrics: rows of the ensemble's ``metrics.csv`` with a ``member`` column, and the member's
    own W&B run (grouped under the ensemble) when the config logs to W&B."""

    def __init__(self, csv_loggers: list, member_loggers: list[list]):
        self.csv_loggers = csv_loggers
        self.member_loggers = member_loggers

    def __call__(self, step: int, member: int, metrics: dict[str, float]) -> None:
        for logger in self.csv_loggers:
            logger.log_metrics({"member": member, **metrics}, step=step)
        for logger in self.member_loggers[member]:
            logger.log_metrics(metrics, step=step)

    def log_image(self, step: int, member: int, key: str, path: Path) -> None:
        for logger in self.member_loggers[member]:
            if hasattr(logger, "log_image"):
                logger.log_image(key, [str(path)], step=step)

    def finalize(self) -> None:
        """Close every logger; each member's W&B run is finished, as the one run of a single training is at exit."""
        for logger in self.csv_loggers:
            logger.finalize("success")
        for logger in (logger for loggers in self.member_loggers for logger in loggers):
            logger.finalize("success")
            logger.experiment.finish()


def _loggers(
    cfg: DictConfig, configs: list[DictConfig], out: Path, resume_from: Path | None
) -> tuple[list, list[list]]:
    """The ensemble's CSV loggers and, per member, a W&B logger for each configured one (grouped under the
    ensemble's run name), which keeps its id when the ensemble resumes in its own directory ``out``."""
    csv_loggers, member_loggers = [], [[] for _ in configs]
    for name, node in (cfg.logger or {}).items():
        if not is_wandb(node):
            csv_loggers.append(instantiate_node(f"logger.{name}", node))
            continue
        for member, config in enumerate(configs):
            # W&B's own keys: the ensemble's group, and one run of its own per member in this process
            member_node = OmegaConf.create(
                {**OmegaConf.to_container(node, resolve=True), "group": cfg.run_name, "reinit": "create_new"}
            )
            member_dir = Path(config.paths.output_dir)
            logger = wandb_logger(
                f"logger.{name}", member_node, member_dir, out, resume_from,
                name=config.run_name, save_dir=str(member_dir),
            )  # fmt: skip
            logger.log_hyperparams(OmegaConf.to_container(config))
            member_loggers[member].append(logger)
    return csv_loggers, member_loggers


class MemberEvaluation(pl.Callback):
    """At every validation of the ensemble (and by ``test``), each member evaluated as a run of its own: its
    current weights loaded into its own module, its evaluation callbacks run by a Trainer of its own, its metrics
    written by ``MemberLog``; ``members/<k>/checkpoints/last.ckpt`` is written each time and ``best.ckpt`` when the
    monitored metric improves."""

    def __init__(self, parts: EnsembleParts, member_log: MemberLog, monitor: str | None, mode: str):
        self.parts = parts
        self.member_log = member_log
        self.monitor, self.mode = monitor, mode
        self.best: list[float | None] = [None] * len(parts.members)
        self.last_validation: list[dict[str, float]] = [{} for _ in parts.members]
        self._modules: list[pl.LightningModule | None] = [None] * len(parts.members)
        self._trainers: list[pl.Trainer | None] = [None] * len(parts.members)

    def _member(self, member: int) -> tuple[pl.LightningModule, pl.Trainer]:
        if self._modules[member] is None:
            parts, config = self.parts.members[member], self.parts.configs[member]
            self._modules[member] = parts.module(config)
            limits = {key: config.trainer[key] for key in ("limit_val_batches", "limit_test_batches")
                      if key in config.trainer}  # fmt: skip
            device = "cuda" if config.trainer.accelerator in ("gpu", "cuda") else "cpu"
            self._trainers[member] = evaluation_trainer(
                parts, Path(config.paths.output_dir), device, enable_progress_bar=False, **limits
            )
        module = self._modules[member]
        module.load_state_dict(self.parts.member_state(member))
        module.evaluation_optimizer = self.parts.member_posterior_optimizer(member, module)
        return module, self._trainers[member]

    def _save(self, member: int, name: str) -> Path:
        path = Path(self.parts.configs[member].paths.output_dir) / "checkpoints" / f"{name}.ckpt"
        CheckpointIO().save_checkpoint(self.parts.member_checkpoint(member), path)
        return path

    def _evaluate(self, member: int, stage: str, step: int, module: pl.LightningModule, trainer: pl.Trainer):
        """``module``'s metrics on the ``stage`` split (val or test), written with its figures by ``MemberLog`` at
        the ensemble's ``step``."""
        run_split = trainer.validate if stage == "val" else trainer.test
        (metrics,) = run_split(module, self.parts.members[member].datamodule, verbose=False)
        metrics = {name: float(value) for name, value in metrics.items()}
        self.member_log(step, member, metrics)
        for callback in self.parts.members[member].evaluation_callbacks:
            for key, path in callback.figures.items():
                self.member_log.log_image(step, member, f"{stage}/{key}", path)
        return metrics

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for member in range(len(self.parts.members)):
            metrics = self._evaluate(member, "val", trainer.global_step, *self._member(member))
            self.last_validation[member] = metrics
            self._save(member, "last")
            value = metrics.get(self.monitor) if self.monitor else None
            if value is not None and math.isfinite(value) and bool(pl_module.active[member]):
                best = self.best[member]
                if best is None or (value > best if self.mode == "max" else value < best):
                    self.best[member] = value
                    self._save(member, "best")

    def state_dict(self) -> dict[str, Any]:
        return {"best": list(self.best)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = list(state_dict.get("best", self.best))

    def test(self, step: int, test_checkpoint: str) -> list[dict[str, Any]]:
        """Each member's test metrics with its best weights (``test_checkpoint=best``, when it has a best
        checkpoint) or its final ones."""
        results = []
        for member in range(len(self.parts.members)):
            last = self._save(member, "last")
            best = last.with_name("best.ckpt")
            tested = "best checkpoint" if test_checkpoint == "best" and best.is_file() else "final weights"
            module, trainer = self._member(member)
            if tested == "best checkpoint":
                module.load_state_dict(load_checkpoint(best)["state_dict"])
            metrics = self._evaluate(member, "test", step, module, trainer)
            results.append({"metrics": metrics, "tested": tested, "best_checkpoint": str(best) if best.is_file()
                            else "", "last_checkpoint": str(last)})  # fmt: skip
        return results


def _mean_and_std(summaries: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    keys = [key for key, value in summaries[0].items() if isinstance(value, float)]
    means, stds = {}, {}
    for key in keys:
        values = [summary[key] for summary in summaries if isinstance(summary.get(key), float)]
        means[key], stds[key] = mean_and_stdev(values)
    return means, stds


def run_ensemble(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate the ensemble ``cfg`` describes; returns the summary written to ``summary.json``."""
    out, resume_from = checked_start(cfg)
    parts = assemble_ensemble(cfg)
    write_config(cfg, out)
    for config in parts.configs:
        write_config(config, Path(config.paths.output_dir))
    member_log = MemberLog(*_loggers(cfg, parts.configs, out, resume_from))
    parts.module.member_log = member_log
    monitor = OmegaConf.select(cfg, "callbacks.checkpoint.monitor")
    evaluation = MemberEvaluation(parts, member_log, monitor, OmegaConf.select(cfg, "callbacks.checkpoint.mode"))
    # the configured checkpoints are the members' (MemberEvaluation); the ensemble keeps its last state
    callbacks = [
        callback for callback in _lightning_callbacks(cfg) if not isinstance(callback, pl.callbacks.ModelCheckpoint)
    ]
    callbacks += [evaluation, LastCheckpoint(last_checkpoint(out))]
    trainer: pl.Trainer = instantiate_node(
        "trainer", cfg.trainer, logger=member_log.csv_loggers or False, callbacks=callbacks, plugins=[CheckpointIO()]
    )
    start = time.perf_counter()
    trainer.fit(parts.module, parts.datamodule, ckpt_path=resume_from, weights_only=True if resume_from else None)
    train_seconds = time.perf_counter() - start
    training_metrics = training_only_metrics(trainer)
    tests = evaluation.test(trainer.global_step, cfg.test_checkpoint)
    steps = trainer.global_step
    member_summaries = []
    for member, (config, member_parts, test) in enumerate(zip(parts.configs, parts.members, tests, strict=True)):
        summary = summarize(
            member_parts, config, test["metrics"], steps=steps, member=member, seed=config.seed,
            tested=test["tested"], best_checkpoint=test["best_checkpoint"], last_checkpoint=test["last_checkpoint"],
            masked=[event for event in parts.module.masked_events if event["member"] == member],
            evaluated_weights="raw",
            **{key: value for key, value in evaluation.last_validation[member].items() if key.startswith(
                "val/gradient_bias")},
            # a member's share of the ensemble's training time, so tables compare it with a run alone
            train_seconds=round(train_seconds / len(parts.members), 2),
            ms_per_step=round(1000 * train_seconds / max(steps, 1) / len(parts.members), 3),
            ensemble_size=len(parts.members),
        )  # fmt: skip
        write_json(Path(config.paths.output_dir) / "summary.json", summary)
        member_summaries.append(summary)
    member_log.finalize()
    means, stds = _mean_and_std(member_summaries)
    summary = {
        "model": cfg.get("run_name"),
        "members": len(parts.members),
        "seeds": parts.module.seeds,
        "vary": EnsembleConfig.of(cfg).vary,
        "steps": steps,
        "train_seconds": round(train_seconds, 2),
        "ms_per_step": round(1000 * train_seconds / max(steps, 1), 3),
        "ms_per_member_step": round(1000 * train_seconds / max(steps, 1) / len(parts.members), 3),
        **training_metrics,
        "masked": parts.module.masked_events,
        "mean": means,
        "std": stds,
        "member_summaries": [str(Path(config.paths.output_dir) / "summary.json") for config in parts.configs],
    }
    write_json(out / "summary.json", summary)
    return summary


def format_ensemble_summary(summary: dict[str, Any], output_dir: str) -> str:
    """The lines ``train.py`` prints at the end of an ensemble."""
    lines = [
        f"trained {summary['members']} members × {summary['steps']} steps in {summary['train_seconds']:.1f} s "
        f"({summary['ms_per_step']:.2f} ms/step, {summary['ms_per_member_step']:.2f} ms per member-step)"
    ]
    for key in ("test/log_likelihood", "test/sm_objective", "test/posterior_gap", "test/objective"):
        if key in summary["mean"]:
            lines.append(f"  {key:<22} {summary['mean'][key]:.4f} ± {summary['std'][key]:.4f} (mean ± sd of members)")
    for event in summary["masked"]:
        lines.append(f"  member {event['member']} (seed {event['seed']}) masked at step {event['step']}: "
                     f"{event['quantity']} = {event['value']}")  # fmt: skip
    lines.append(f"  run directory          {output_dir} (members/<k>/ per member)")
    return "\n".join(lines)


def export_member(checkpoint: str | Path, member: int, out: str | Path | None = None) -> Path:
    """Write member ``member`` of the ensemble checkpoint ``checkpoint`` (a file or a run directory: its
    ``checkpoints/last.ckpt``) as an ordinary checkpoint, by default ``<run>/members/<member>/checkpoints/
    exported.ckpt``; returns its path."""
    file = Path(checkpoint)
    file = last_checkpoint(file) if file.is_dir() else file
    saved = load_checkpoint(file)
    record = saved.get(RECORD_KEY, {})
    config = OmegaConf.create(record.get("config", {}))
    ensemble = EnsembleConfig.of(config)
    require(ensemble.size > 1, "checkpoint", str(file), "is not an ensemble's checkpoint (ensemble.size is 1)")
    require(0 <= member < ensemble.size, "member", member, f"the ensemble has members 0 … {ensemble.size - 1}")
    parts = assemble_ensemble(config)
    parts.module.load_state_dict(saved["state_dict"])
    target = Path(out) if out else Path(parts.configs[member].paths.output_dir) / "checkpoints" / "exported.ckpt"
    exported = parts.member_checkpoint(member)
    exported["global_step"] = saved.get("global_step")
    CheckpointIO().save_checkpoint(exported, target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export one member of an ensemble as an ordinary checkpoint.")
    parser.add_argument("checkpoint", help="an ensemble's run directory (its checkpoints/last.ckpt) or .ckpt file")
    parser.add_argument("--member", type=int, required=True, help="the member's index, 0 … ensemble.size - 1")
    parser.add_argument("--out", type=Path, help="default: <run>/members/<member>/checkpoints/exported.ckpt")
    args = parser.parse_args(argv)
    try:
        path = export_member(args.checkpoint, args.member, args.out)
    except (ConfigError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
