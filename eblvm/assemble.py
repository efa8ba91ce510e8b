"""The one builder: a run's config turned into its parts with every cross-group check, and a checkpoint turned
back into its run.

``assemble(cfg)`` builds the data, model, posterior, objective, the optimizer, evaluation and sampling settings
and the evaluation callbacks that apply; ``rebuild(checkpoint)`` does the same from the config a checkpoint
carries and loads its weights. Training (``eblvm.run``), ``python -m eblvm.sample``, ``python -m eblvm.evaluate``
and the studies all go through here. Only allowed ``_target_``s are instantiated (``check_targets``): eblvm's own
components and the Lightning classes its configs name, never a function such as ``torch.load`` that a crafted
config (or one stored in a checkpoint) could point at.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from eblvm.bilevel.bidvl import BidvlModule
from eblvm.bilevel.module import BilevelModule
from eblvm.bilevel.optim import OptimConfig
from eblvm.callbacks.base import EvaluationCallback
from eblvm.checkpoints import FORMAT_VERSION, RECORD_KEY, load_checkpoint, resolve_checkpoint
from eblvm.errors import ConfigError, require, require_choice, require_count
from eblvm.evaluation.settings import EvalConfig
from eblvm.models.base import EnergyModel
from eblvm.objectives.base import Objective
from eblvm.posteriors.base import Posterior
from eblvm.sampling.draw import SamplingConfig

# Notices that do not apply here: data are in-memory tensors (no workers needed), and deprecations inside
# Lightning and torchdata themselves.
for message in (
    ".*does not have many workers.*",
    ".*'set_vital' is deprecated.*",
    ".*isinstance\\(treespec, LeafSpec\\).*",
):
    warnings.filterwarnings("ignore", message=message)


# Where eblvm's own buildable components live: a ``_target_`` under ``eblvm.`` must be a class or function
# defined in one of these packages.
EBLVM_COMPONENT_PACKAGES = (
    "eblvm.data",
    "eblvm.models",
    "eblvm.posteriors",
    "eblvm.objectives",
    "eblvm.callbacks",
    "eblvm.loggers",
)
# The other classes eblvm's configs instantiate.
ALLOWED_TARGETS = frozenset(
    {
        "pytorch_lightning.Trainer",
        "pytorch_lightning.callbacks.ModelCheckpoint",
        "pytorch_lightning.callbacks.TQDMProgressBar",
        "pytorch_lightning.callbacks.RichProgressBar",
        "pytorch_lightning.callbacks.LearningRateMonitor",
        "pytorch_lightning.loggers.WandbLogger",
        "pytorch_lightning.loggers.CSVLogger",
        "pytorch_lightning.strategies.DDPStrategy",
        "pytorch_lightning.plugins.environments.SLURMEnvironment",
        "pytorch_lightning.profilers.SimpleProfiler",
        "pytorch_lightning.profilers.AdvancedProfiler",
        "pytorch_lightning.profilers.PyTorchProfiler",
    }
)
# Packages of your own components (your models, objectives), as a comma-separated list of module prefixes in this
# environment variable, e.g. EBLVM_TRUSTED_TARGETS=mylab.models,mylab.objectives: a config cannot change it.
TRUSTED_TARGETS_VARIABLE = "EBLVM_TRUSTED_TARGETS"
WEIGHTS = ("saved", "raw")
DEFAULT_CALLBACKS = Path(__file__).resolve().parents[1] / "conf" / "callbacks" / "default.yaml"


def _trusted_packages() -> tuple[str, ...]:
    extra = [prefix.strip().rstrip(".") for prefix in os.environ.get(TRUSTED_TARGETS_VARIABLE, "").split(",")]
    return (*EBLVM_COMPONENT_PACKAGES, *(prefix for prefix in extra if prefix))


def _is_component(target: str) -> bool:
    """Whether ``target`` names a class or function defined in eblvm's component packages or in a package of
    ``EBLVM_TRUSTED_TARGETS``; nothing outside those packages is imported to decide."""
    packages = _trusted_packages()
    if not target.startswith(tuple(f"{package}." for package in packages)):
        return False
    try:
        obj = get_object(target)
    except Exception:  # a misspelt name: refused like any other target outside the allowlist
        return False
    defined_in = getattr(obj, "__module__", None) or ""
    return (inspect.isclass(obj) or inspect.isfunction(obj)) and defined_in.startswith(packages)


def check_targets(node: Any, path: str = "") -> None:
    """Raise ``ConfigError`` naming the key of the first ``_target_`` (at any depth of ``node``) that is neither
    a component (``_is_component``) nor in ``ALLOWED_TARGETS``."""
    if isinstance(node, DictConfig | dict):
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
        for key, value in items:
            key_path = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                if not (value in ALLOWED_TARGETS or _is_component(str(value))):
                    raise ConfigError(
                        key_path,
                        value,
                        "is not a class eblvm builds: targets must be eblvm's own components "
                        f"({', '.join(p + '.*' for p in EBLVM_COMPONENT_PACKAGES)}) or one of "
                        f"{', '.join(sorted(ALLOWED_TARGETS))}; trust your own packages with the environment "
                        f"variable {TRUSTED_TARGETS_VARIABLE}",
                    )
            else:
                check_targets(value, key_path)
    elif isinstance(node, ListConfig | list | tuple):
        for index, value in enumerate(node):
            check_targets(value, f"{path}[{index}]")


def resolved(node: DictConfig) -> DictConfig:
    """``node`` with every interpolation and resolver evaluated, so nothing is left for Hydra to build later."""
    return OmegaConf.create(OmegaConf.to_container(node, resolve=True))


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


def instantiate_node(group: str, node: DictConfig, **runtime: Any) -> Any:
    """``instantiate(node)`` of an allowed target, passing only the ``runtime`` arguments its target accepts
    (as they are: Hydra would turn a dataclass argument into a config).

    A ``ConfigError`` raised by a constructor is re-raised with the group's prefix (``sigma`` → ``objective.sigma``)
    and Hydra's wrapper is removed from a missing-file error, so the user sees the message that names the fix.
    """
    node = resolved(node)  # an interpolation could build a target of its own: check what Hydra would build
    check_targets(node, group)
    accepted = inspect.signature(get_object(node._target_)).parameters
    check_unknown_keys(group, node, accepted)
    try:
        factory = instantiate(node, _partial_=True)
        return factory(**{k: v for k, v in runtime.items() if k in accepted})
    except ConfigError as error:
        raise error.with_prefix(group) from None
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
    known = {field.name for field in dataclasses.fields(cls)}
    for key in values:
        require(key in known, f"{group}.{key}", values[key], f"no such key; the keys are {', '.join(sorted(known))}")
    try:
        return (getattr(cls, "from_dict", None) or (lambda fields: cls(**fields)))(values)
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


def check_run_settings(cfg: DictConfig) -> None:
    """The top-level settings of a training run, and the trainer's devices."""
    require_count("trainer.max_steps", cfg.trainer.max_steps, 1)
    require_choice("test_checkpoint", cfg.test_checkpoint, ("best", "last"))
    ema_decay = cfg.get("ema_decay")
    require(ema_decay is None or 0 < ema_decay < 1, "ema_decay", ema_decay, "must be null or in (0, 1), e.g. 0.999")
    check_devices(cfg.trainer)


def check_pairing(
    model: EnergyModel, posterior: Posterior | None, objective: Objective, generator: torch.nn.Module | None = None
) -> None:
    """Cross-group checks: latent sizes and types agree, and the objective can use this model. With a generator
    (BiDVL) the posterior's latent is the generator's, not the energy's."""
    if objective.needs_generator:
        require(
            generator.h_dim == posterior.h_dim,
            "generator.h_dim",
            generator.h_dim,
            f"must equal posterior.h_dim={posterior.h_dim} (the encoder's and the generator's latent)",
        )
    elif objective.needs_posterior:
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


@dataclass
class RunParts:
    """What a run's config builds. ``datamodule`` is None when built without data (``data_shapes`` then come
    from a checkpoint); ``evaluation_callbacks`` holds the configured evaluation callbacks that apply; ``generator``
    is the network of an objective that trains one (BiDVL)."""

    config: DictConfig
    datamodule: Any
    data_shapes: dict[str, Any]
    model: EnergyModel
    posterior: Posterior | None
    objective: Objective
    optim: OptimConfig
    evaluation: EvalConfig
    sampling: SamplingConfig
    sampling_mode: str
    evaluation_callbacks: list[EvaluationCallback] = field(default_factory=list)
    generator: torch.nn.Module | None = None

    def logged_metrics(self) -> set[str]:
        """Names (without stage) of every metric this run logs at validation and test."""
        return {"objective"} | {name for callback in self.evaluation_callbacks for name in callback.logged}

    def evaluation_record(self) -> dict[str, Any]:
        """What the evaluation callbacks recorded for a summary: which ran, the facts behind their metrics
        (``log_z``: how log Z was computed, None without a log-likelihood), the sampling mode and their figures."""
        callbacks = self.evaluation_callbacks
        return {
            "log_z": None,
            **{key: value for callback in callbacks for key, value in callback.facts.items()},
            "sampling_mode": self.sampling_mode,
            "evaluations": [type(callback).__name__ for callback in callbacks],
            "figures": {name: str(path) for callback in callbacks for name, path in callback.figures.items()},
        }

    def module(self, cfg: DictConfig) -> BilevelModule:
        """The Lightning module that trains these parts (``BidvlModule`` for an objective with a generator),
        recording the config that rebuilds them."""
        record = {"config": OmegaConf.to_container(cfg, resolve=True), "data_shapes": self.data_shapes}
        settings = {
            "seed": cfg.seed,
            "on_nonfinite": cfg.on_nonfinite,
            "max_consecutive_skips": cfg.max_consecutive_skips,
            "run_record": record,
        }
        if self.objective.needs_generator:
            return BidvlModule(self.model, self.posterior, self.generator, self.objective, self.optim, **settings)
        return BilevelModule(self.model, self.posterior, self.objective, self.optim, **settings)


def _data_shapes(datamodule) -> dict[str, Any]:
    image_shape = None if datamodule.image_shape is None else list(datamodule.image_shape)
    return {"v_dim": datamodule.dim, "image_shape": image_shape}


def build_evaluation_callbacks(cfg: DictConfig, parts: RunParts) -> list[EvaluationCallback]:
    """The evaluation callbacks under ``cfg.callbacks`` that apply to this run's model, posterior, objective and
    data (``EvaluationCallback.applies``), given the run's ``evaluation`` and ``sampling`` settings."""
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or not issubclass(get_object(node._target_), EvaluationCallback):
            continue
        settings = {"evaluation": parts.evaluation, "sampling": parts.sampling, "sampling_mode": parts.sampling_mode}
        callback = instantiate_node(f"callbacks.{name}", node, **settings)
        if callback.applies(parts.model, parts.posterior, parts.objective, parts.datamodule):
            callbacks.append(callback)
    return callbacks


def assemble(
    cfg: DictConfig, with_data: bool = True, data_shapes: dict[str, Any] | None = None, seed: bool = True
) -> RunParts:
    """Build and check the parts ``cfg`` names, before any training.

    ``seed`` seeds every global generator with ``cfg.seed`` before the data and weights are drawn (training);
    without data (``with_data=False``) the model's sizes come from ``data_shapes`` and no evaluation callback is
    built.
    """
    check_targets(resolved(cfg))
    objective = instantiate_node("objective", cfg.objective)
    optim = build_dataclass("optim", OptimConfig, cfg.optim)
    evaluation = build_dataclass("evaluation", EvalConfig, cfg.evaluation)
    sampling = build_dataclass("sampling", SamplingConfig, cfg.sampling)
    if seed:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate_node("data", cfg.data) if with_data else None
    if datamodule is not None:
        data_shapes = _data_shapes(datamodule)
    require(data_shapes is not None, "data", None, "a run without its data needs the data shapes of a checkpoint")
    shapes = {"v_dim": data_shapes["v_dim"], "image_shape": data_shapes["image_shape"]}
    model = instantiate_node("model", cfg.model, **shapes)
    posterior = (
        instantiate_node("posterior", cfg.posterior, **shapes, model=model) if objective.needs_posterior else None
    )
    generator = build_generator(cfg, objective, shapes)
    check_pairing(model, posterior, objective, generator)
    sampling_mode = (
        "gibbs" if model.has_gibbs_sampler else _resolve_sampling_mode(sampling, model, posterior, generator)
    )
    parts = RunParts(
        cfg,
        datamodule,
        data_shapes,
        model,
        posterior,
        objective,
        optim,
        evaluation,
        sampling,
        sampling_mode,
        generator=generator,
    )
    if datamodule is not None:
        objective.check_data(datamodule)
        parts.evaluation_callbacks = build_evaluation_callbacks(cfg, parts)
        _check_monitor(cfg, parts)
        objective.prepare(datamodule.train_data)
    return parts


def build_generator(cfg: DictConfig, objective: Objective, shapes: dict[str, Any]) -> torch.nn.Module | None:
    """The ``generator`` group's network for an objective that trains one (BiDVL); it must be set exactly then."""
    node = cfg.get("generator")
    if not objective.needs_generator:
        require(
            node is None,
            "generator",
            OmegaConf.select(cfg, "generator._target_"),
            f"only objectives that train a generator use one (objective=bidvl), not {type(objective).__name__}: "
            "remove generator=...",
        )
        return None
    require(
        node is not None and "_target_" in node,
        "generator",
        None if node is None else OmegaConf.to_container(node),
        f"{type(objective).__name__} trains a generator: choose one with generator=dcgan or generator=sngan_resnet",
    )
    return instantiate_node("generator", node, image_shape=shapes["image_shape"])


def _resolve_sampling_mode(
    sampling: SamplingConfig, model: EnergyModel, posterior: Posterior | None, generator: torch.nn.Module | None
) -> str:
    try:
        return sampling.resolve_mode(model, posterior, generator)
    except ConfigError as error:
        raise error.with_prefix("sampling") from None


def _check_monitor(cfg: DictConfig, parts: RunParts) -> None:
    """The metric ``callbacks.checkpoint`` selects the best checkpoint by must be one this run logs."""
    monitor = OmegaConf.select(cfg, "callbacks.checkpoint.monitor")
    if monitor is None:
        return
    stage, _, name = str(monitor).partition("/")
    logged = parts.logged_metrics()
    require(
        stage == "val" and name in logged,
        "callbacks.checkpoint.monitor",
        monitor,
        f"this run logs no such validation metric; it logs {', '.join('val/' + n for n in sorted(logged))} "
        "(e.g. callbacks.checkpoint.monitor=val/objective callbacks.checkpoint.mode=min)",
    )


@dataclass
class TrainedRun:
    """A run rebuilt from a checkpoint: its config, parts (weights loaded) and the loaded checkpoint."""

    config: DictConfig
    parts: RunParts
    checkpoint: dict[str, Any]
    path: Path

    @property
    def model(self) -> EnergyModel:
        return self.parts.model

    @property
    def posterior(self) -> Posterior | None:
        return self.parts.posterior

    @property
    def datamodule(self):
        return self.parts.datamodule


def _submodule_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name.removeprefix(prefix): value for name, value in state.items() if name.startswith(prefix)}


def _single_run_if_older(config: DictConfig) -> DictConfig:
    """A config written before ensembles existed describes a single run: say so, as today's configs do."""
    if "ensemble" not in config:
        config.ensemble = {"size": 1, "seeds": None, "vary": {}}
    return config


def saved_config(checkpoint: dict[str, Any], file: Path) -> tuple[DictConfig, dict[str, Any] | None]:
    """The config (and data shapes) a checkpoint was trained with: from the checkpoint itself, or, for one
    written before checkpoints carried them (format 0), from its run directory's ``config.yaml``."""
    record = checkpoint.get(RECORD_KEY)
    if record is not None:
        version = record.get("format_version")
        if version != FORMAT_VERSION or not {"config", "data_shapes"} <= record.keys():
            raise ConfigError(
                "checkpoint",
                str(file),
                f"has an eblvm record of format {version!r} (this eblvm reads format {FORMAT_VERSION}, with a config "
                "and data shapes): it was written by another version of eblvm",
            )
        if "${" in json.dumps(record["config"]):
            raise ConfigError(
                "checkpoint", str(file), "holds a config with interpolations: eblvm stores resolved configs only"
            )
        return _single_run_if_older(OmegaConf.create(record["config"])), record["data_shapes"]
    config_file = file.parent.parent / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(
            "checkpoint",
            str(file),
            f"holds no config (it was written before checkpoints carried one) and {config_file} is missing: "
            "such a checkpoint must sit in <run>/checkpoints/ of its run",
        )
    config = OmegaConf.load(config_file)
    # its config predates the evaluation callbacks: evaluate it with today's defaults
    default_callbacks = OmegaConf.load(DEFAULT_CALLBACKS)
    for name, node in default_callbacks.items():
        if name not in config.callbacks and issubclass(get_object(node._target_), EvaluationCallback):
            config.callbacks[name] = node
    return _single_run_if_older(config), None


def rebuild(
    checkpoint: str | Path,
    weights: str = "saved",
    with_data: bool = True,
    overrides: Sequence[str] = (),
    saved: dict[str, Any] | None = None,
) -> TrainedRun:
    """Rebuild the run that wrote ``checkpoint`` (a file, or a run directory: its ``checkpoints/last.ckpt``) with
    ``overrides`` (``key=value``) applied to its config, and load the checkpoint's weights.

    ``weights="saved"`` loads the checkpoint's ``state_dict`` (the EMA weights when the run averaged them);
    ``"raw"`` the raw weights of an EMA run. ``with_data`` builds the datamodule (needed to sample via q and to
    evaluate); without it the model's sizes come from the checkpoint. ``saved``: the checkpoint already loaded.
    """
    require_choice("weights", weights, WEIGHTS)
    file = resolve_checkpoint(checkpoint)
    saved = load_checkpoint(file) if saved is None else saved
    config, data_shapes = saved_config(saved, file)
    if config.ensemble.size > 1:
        raise ConfigError(
            "checkpoint",
            str(file),
            f"is an ensemble's ({config.ensemble.size} members): use a member's run directory <run>/members/<k>, "
            "or export one with python -m eblvm.ensemble <run> --member k",
        )
    config.merge_with_dotlist(list(overrides))
    if not with_data and data_shapes is None:
        raise ConfigError("checkpoint", str(file), "holds no data shapes (format 0): rebuild it with its data")
    parts = assemble(config, with_data=with_data, data_shapes=data_shapes, seed=False)
    state = saved["state_dict"]
    if weights == "raw":
        if "current_model_state" not in saved:
            raise ConfigError("weights", weights, f"{file} holds no separate raw weights (the run used no EMA)")
        state = saved["current_model_state"]
    parts.model.load_state_dict(_submodule_state(state, "model."))
    if parts.posterior is not None:
        parts.posterior.load_state_dict(_submodule_state(state, "posterior."))
    if parts.generator is not None:
        parts.generator.load_state_dict(_submodule_state(state, "generator_net."))
    if with_data:  # the objective's buffers are sized by the data (``Objective.prepare``)
        parts.objective.load_state_dict(_submodule_state(state, "objective."))
    return TrainedRun(config, parts, saved, file)
