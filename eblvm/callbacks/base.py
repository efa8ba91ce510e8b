"""What every evaluation callback shares: when it applies, which stage it is in, where its figures go."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from eblvm.models.base import EnergyModel
from eblvm.objectives.base import Objective
from eblvm.posteriors.base import Posterior


class EvaluationCallback(pl.Callback):
    """A metric or figure computed during validation and test.

    ``applies`` says, from what the model, posterior, objective and data can do (their capability flags), whether
    the callback has anything to compute for this run; the builder keeps only the callbacks that apply, so a
    config can list every evaluation and each run gets the ones that make sense for it. ``logged`` names the
    metrics it logs; ``figures`` (name → path) and ``facts`` (how a metric was computed) go into the run's
    summary.
    """

    logged: tuple[str, ...] = ()  # the metrics it logs, without the stage prefix (val/, test/)

    def __init__(self):
        self.figures: dict[str, Path] = {}
        self.facts: dict[str, Any] = {}

    def applies(self, model: EnergyModel, posterior: Posterior | None, objective: Objective, datamodule) -> bool:
        return True


def stage_of(trainer: pl.Trainer) -> str:
    """``test`` during ``trainer.test``, else ``val``: the prefix of the metrics logged now."""
    return "test" if trainer.testing else "val"


def log_image(trainer: pl.Trainer, key: str, path: Path) -> None:
    """Send a saved image to every logger that takes images (W&B)."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key, [str(path)], step=trainer.global_step)


@contextlib.contextmanager
def network_mode(module: nn.Module, mode: str):
    """``module`` in ``mode`` (``eval``, or ``train``: batch-norm layers normalise with batch statistics) for the
    block; its buffers (running statistics, power-iteration vectors) and its mode are restored afterwards, so an
    evaluation in train mode leaves the trained state as it was."""
    was_training = module.training
    saved = [buffer.detach().clone() for buffer in module.buffers()]
    module.train(mode == "train")
    try:
        yield module
    finally:
        with torch.no_grad():
            for buffer, value in zip(module.buffers(), saved, strict=True):
                buffer.copy_(value)
        module.train(was_training)
