"""The schema of ``conf/train.yaml``, registered with Hydra's ConfigStore as ``train_schema``.

``train.yaml`` lists it first in its defaults, so Hydra checks every composed config against it: a misspelt
top-level key (``evaluaton:``) or a misspelt key of ``evaluation``, ``sampling`` or ``optim`` (in an experiment
file as well as on the command line) stops composition with ``Key '…' not in '…'``, and values are type-checked.
Values come from the YAML files (``MISSING`` here); the group nodes of components built by ``_target_`` (data,
model, posterior, objective, trainer, loggers, callbacks) are checked by their constructors' signatures instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from eblvm.bilevel.optim import OptimConfig
from eblvm.evaluation.settings import EvalConfig
from eblvm.sampling.draw import SamplingConfig


@dataclass
class TrainConfig:
    """Every key a run's config may hold at the top level (see ``conf/train.yaml`` for what each one means)."""

    seed: int = MISSING
    run_name: str = MISSING
    test_checkpoint: str = MISSING
    ckpt_path: Optional[str] = None  # noqa: UP045 (OmegaConf reads typing.Optional)
    auto_resume: bool = MISSING
    on_nonfinite: str = MISSING
    max_consecutive_skips: int = MISSING
    optimized_metric: Optional[str] = None  # noqa: UP045
    ema_decay: Optional[float] = None  # noqa: UP045
    evaluation: Any = MISSING  # the keys of EvalConfig, SamplingConfig and OptimConfig: see train_schema()
    sampling: Any = MISSING
    optim: Any = MISSING
    data: Any = MISSING
    model: Any = MISSING
    posterior: Any = MISSING
    objective: Any = MISSING
    generator: Any = None
    trainer: Any = MISSING
    logger: Any = None
    callbacks: Any = MISSING
    paths: Any = MISSING
    ensemble: Any = None  # size, seeds, vary: checked by eblvm.ensemble.EnsembleConfig


def _keys_of(config_class: type) -> DictConfig:
    """The keys and types of a (frozen) config dataclass as a writable schema node; its constructor still
    validates the values when the run builds it."""
    node = OmegaConf.structured(config_class)
    _make_writable(node)
    return node


def _make_writable(node: DictConfig) -> None:
    """Clear the read-only flag that frozen dataclasses set, on ``node`` and every nested dataclass node."""
    OmegaConf.set_readonly(node, False)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _make_writable(child)


def train_schema() -> DictConfig:
    """``TrainConfig`` with ``evaluation``, ``sampling`` and ``optim`` typed by the dataclasses that read them."""
    schema = OmegaConf.structured(TrainConfig)
    schema.evaluation = _keys_of(EvalConfig)
    schema.sampling = _keys_of(SamplingConfig)
    schema.optim = _keys_of(OptimConfig)
    return schema


ConfigStore.instance().store(name="train_schema", node=train_schema())
