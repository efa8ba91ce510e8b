"""Evaluation callbacks for models whose likelihood, score or posterior are exact: log-likelihood, SM objective,
posterior gap, BiSM's gradient bias; and training time."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch

from eblvm.callbacks.base import EvaluationCallback, stage_of
from eblvm.evaluation.likelihood import LogPartition, has_log_likelihood, log_likelihood
from eblvm.evaluation.posterior import gradient_bias, has_posterior_gap, posterior_gap
from eblvm.evaluation.settings import EvalConfig
from eblvm.objectives.score_losses import score_matching

# Evaluation generator streams (``BilevelModule.evaluation_generator``); 0 is the validation loss's.
LOG_PARTITION_STREAM, GRADIENT_BIAS_STREAM = 1, 5


class _PerBatchMetric(EvaluationCallback):
    """A metric computed on every validation and test batch and averaged over the split (``sync_dist``)."""

    key: str

    @property
    def logged(self) -> tuple[str, ...]:
        return (self.key,)

    def compute(self, pl_module: pl.LightningModule, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, v: torch.Tensor) -> None:
        value = self.compute(pl_module, v)
        stage = stage_of(trainer)
        pl_module.log(f"{stage}/{self.key}", value, batch_size=v.shape[0], sync_dist=True, prog_bar=stage == "val")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._log(trainer, pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._log(trainer, pl_module, batch)


class LogLikelihood(_PerBatchMetric):
    """``log_likelihood``: mean ``−F(v) − log Z`` in nats per point, and ``log_likelihood_stderr``, the standard
    error of the AIS estimate of ``log Z`` (0 when it is exact). ``log Z`` is computed once per evaluation, exact
    or by AIS as ``evaluation.*`` says, with the same generator on every rank, so all ranks use the same value.
    For models with a free energy and an exact or AIS log-partition."""

    key = "log_likelihood"
    logged = ("log_likelihood", "log_likelihood_stderr")

    def __init__(self, evaluation: EvalConfig):
        super().__init__()
        self.evaluation = evaluation
        self.log_z: LogPartition | None = None

    def applies(self, model, posterior, objective, datamodule) -> bool:
        return has_log_likelihood(model)

    def _start(self, pl_module) -> None:
        generator = pl_module.evaluation_generator(LOG_PARTITION_STREAM, per_rank=False)
        self.log_z = self.evaluation.log_partition(pl_module.model, generator)
        self.facts["log_z"] = self.evaluation.describe_log_partition(self.log_z)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def compute(self, pl_module, v: torch.Tensor) -> torch.Tensor:
        return log_likelihood(pl_module.model, v, self.log_z)

    def _log_stderr(self, trainer, pl_module) -> None:
        pl_module.log(f"{stage_of(trainer)}/log_likelihood_stderr", float(self.log_z.stderr), batch_size=1)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._log_stderr(trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log_stderr(trainer, pl_module)


class SMObjective(_PerBatchMetric):
    """``sm_objective``: ``mean[½‖s(v)‖² + tr ∇_v s(v)]`` with the exact score and the exact trace (one backward
    pass per dimension: vector data only): the Fisher divergence to the data minus a constant, lower is better
    (docs/methods.md §8)."""

    key = "sm_objective"

    def applies(self, model, posterior, objective, datamodule) -> bool:
        return model.has_free_energy and model.image_shape is None

    def compute(self, pl_module, v: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            return score_matching(pl_module.model.score, v).detach()


class PosteriorGap(_PerBatchMetric):
    """``posterior_gap``: mean ``KL(q(h|v) ‖ p(h|v))`` against the model's exact posterior."""

    key = "posterior_gap"

    def applies(self, model, posterior, objective, datamodule) -> bool:
        return has_posterior_gap(model, posterior)

    def compute(self, pl_module, v: torch.Tensor) -> torch.Tensor:
        return posterior_gap(pl_module.model, pl_module.posterior, v)


class GradientBias(EvaluationCallback):
    """``gradient_bias`` (with ``_relative`` and ``_stderr``), at validation only: how far the energy gradient of
    an objective with a variational score is from that of the same objective with the exact score, at the current
    parameters, over ``evaluation.gradient_bias_repeats`` draws on the first ``evaluation.gradient_bias_batch``
    rows of the first validation batch (``eblvm.evaluation.posterior.gradient_bias``; docs/methods.md §8)."""

    logged = ("gradient_bias", "gradient_bias_relative", "gradient_bias_stderr")

    def __init__(self, evaluation: EvalConfig):
        super().__init__()
        self.evaluation = evaluation

    def applies(self, model, posterior, objective, datamodule) -> bool:
        return (
            objective.needs_posterior
            and model.has_free_energy
            and objective.with_exact_score() is not None
            and self.evaluation.gradient_bias_repeats > 0
        )

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx != 0:
            return
        with torch.enable_grad():
            result = gradient_bias(
                pl_module.model,
                pl_module.posterior,
                pl_module.posterior_optimizer(),
                pl_module.objective,
                batch[: self.evaluation.gradient_bias_batch],
                repeats=self.evaluation.gradient_bias_repeats,
                seed=pl_module.evaluation_seed(GRADIENT_BIAS_STREAM),
            )
        values = {"gradient_bias": result.bias, "gradient_bias_relative": result.relative_bias}
        values["gradient_bias_stderr"] = result.stderr
        pl_module.log_dict({f"val/{k}": float(v) for k, v in values.items()}, batch_size=1, sync_dist=True)


class Timing(EvaluationCallback):
    """``train/seconds_per_1000_steps``: training time between two validations inside ``fit`` (validation
    excluded), logged at each validation."""

    def __init__(self):
        super().__init__()
        self._clock: tuple[float, int] | None = None  # (time, global step) when training last resumed
        self._seconds_per_1000_steps: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._clock = (time.perf_counter(), trainer.global_step)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self._clock is not None and not trainer.sanity_checking:
            started, step = self._clock
            if trainer.global_step > step:
                self._seconds_per_1000_steps = 1000 * (time.perf_counter() - started) / (trainer.global_step - step)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._clock is not None and self._seconds_per_1000_steps is not None:
            pl_module.log("train/seconds_per_1000_steps", self._seconds_per_1000_steps, sync_dist=True)
            self._clock = (time.perf_counter(), trainer.global_step)
