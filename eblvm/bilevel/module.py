"""The Lightning module: one bi-level iteration per batch, with manual optimization, and the validation loss.

Everything else measured during evaluation (log-likelihood, posterior gap, gradient bias, samples, FID, ...) is
an evaluation callback (``eblvm.callbacks``) switched on by what the model and posterior can do.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import Precision
from torch import nn

from eblvm.bilevel.optim import OptimConfig
from eblvm.bilevel.unroll import unroll
from eblvm.checkpoints import (
    FORMAT_VERSION,
    RECORD_KEY,
    gather_rank_states,
    own_rank_state,
    random_states,
    set_random_states,
)
from eblvm.errors import DivergenceError, require_choice, require_count
from eblvm.models.base import EnergyModel
from eblvm.objectives.base import Objective
from eblvm.objectives.estimators import frozen_energy
from eblvm.posteriors.base import BoundPosterior, Posterior

NONFINITE_POLICIES = ("stop", "skip")

# Streams of the evaluation generators, apart from each other and from training (``evaluation_generator``).
VALIDATION_LOSS_STREAM = 0


class BilevelModule(pl.LightningModule):
    """Trains an energy model, and a variational posterior when the objective needs one.

    Per batch ``v`` (docs/methods.md §1.4):

    1. ``n_lower_steps`` real steps of q on the lower loss with the energy held fixed, then q's scheduler step;
    2. ``n_unroll`` differentiable steps from detached copies of q's weights and optimizer state (``φ_N(θ)``);
    3. the higher loss with ``φ_N``, backward into θ only, optional clipping, one energy step and its schedule.

    Exact-score objectives skip 1–2. Every rank draws its training noise from a generator seeded ``seed + rank``;
    evaluation draws from generators of its own (``evaluation_generator``), so evaluating more or less often
    never changes the trained parameters. Checkpoints hold every rank's generator state and per-rank objective
    state (PCD's chains), the global random states, and ``run_record`` (the config that rebuilds the run), so a
    resumed run draws the same noise as an uninterrupted one.

    A non-finite loss or gradient is caught before the energy's parameters are touched, with one decision for all
    ranks: ``on_nonfinite="stop"`` raises ``DivergenceError``; ``"skip"`` restores q, both optimizers and both
    schedulers to their state before the iteration, counts it in ``train/skipped_steps`` and raises only after
    ``max_consecutive_skips`` dropped iterations in a row.
    """

    def __init__(
        self,
        model: EnergyModel,
        posterior: Posterior | None,
        objective: Objective,
        optim: OptimConfig,
        seed: int = 0,
        on_nonfinite: str = "stop",
        max_consecutive_skips: int = 10,
        run_record: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.posterior = posterior if objective.needs_posterior else None
        self.objective = objective
        self.generator_net: nn.Module | None = None  # the generator of objectives that train one (BidvlModule)
        self.optim = optim
        self.seed = seed
        require_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
        require_count("max_consecutive_skips", max_consecutive_skips, 1)
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.run_record = run_record or {}
        self.skipped_steps = 0
        self._consecutive_skips = 0
        self._generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None
        self._validation_generator: torch.Generator | None = None
        self.evaluation_optimizer: torch.optim.Optimizer | None = None  # ``posterior_optimizer`` outside fit

    # randomness -----------------------------------------------------------------------------------------------
    @property
    def generator(self) -> torch.Generator:
        """This rank's training noise generator, created on the module's device and seeded ``seed + rank``."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = self._new_generator()
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
                self._generator_state = None
        return self._generator

    def _new_generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed + self.global_rank)

    def evaluation_generator(self, stream: int, per_rank: bool = True) -> torch.Generator:
        """A fresh generator on the module's device for evaluation stream ``stream``, seeded from
        ``(seed, rank, stream)`` (``per_rank=False``: the same on every rank): the same noise at every evaluation,
        apart from training and from other streams."""
        return torch.Generator(device=self.device).manual_seed(self.evaluation_seed(stream, per_rank))

    def evaluation_seed(self, stream: int, per_rank: bool = True) -> int:
        """The seed of ``evaluation_generator(stream, per_rank)``, for evaluations that seed generators of their
        own from it."""
        rank = self.global_rank if per_rank else 0
        return int(np.random.SeedSequence([self.seed, rank, 1 + stream]).generate_state(1, np.uint64)[0] >> 1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Called on every rank; rank 0 writes the file, so the per-rank states are gathered first."""
        checkpoint[RECORD_KEY] = {"format_version": FORMAT_VERSION, **self.run_record}
        checkpoint["eblvm_generator_states"] = gather_rank_states(self._trainer, self.generator.get_state())
        checkpoint["eblvm_rank_buffers"] = {
            name: gather_rank_states(self._trainer, buffer) for name, buffer in self._per_rank_buffers().items()
        }
        checkpoint["eblvm_global_rng_states"] = random_states()
        checkpoint["eblvm_skipped_steps"] = (self.skipped_steps, self._consecutive_skips)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        own = own_rank_state(self._trainer, checkpoint.get("eblvm_generator_states"))
        self._generator, self._generator_state = None, own
        for name, stacked in checkpoint.get("eblvm_rank_buffers", {}).items():
            rank_buffer = own_rank_state(self._trainer, stacked)
            if rank_buffer is not None:  # loaded into the module with the rest of the state_dict
                checkpoint["state_dict"][name] = rank_buffer
                if name in checkpoint.get("current_model_state", {}):  # what EMA puts back as the live state
                    checkpoint["current_model_state"][name] = rank_buffer
        if "eblvm_global_rng_states" in checkpoint:
            set_random_states(checkpoint["eblvm_global_rng_states"])
        self.skipped_steps, self._consecutive_skips = checkpoint.get("eblvm_skipped_steps", (0, 0))

    def _per_rank_buffers(self) -> dict[str, torch.Tensor]:
        """The objective's buffers that differ between ranks (``Objective.per_rank_buffers``), by state_dict name."""
        return {f"objective.{name}": getattr(self.objective, name) for name in self.objective.per_rank_buffers}

    def __getstate__(self):  # a generator is rebuilt in each process (spawned DDP workers included)
        state = super().__getstate__()
        state["_generator_state"] = None if self._generator is None else self._generator.get_state()
        state["_generator"] = None
        state["_validation_generator"] = None
        return state

    # optimizers -----------------------------------------------------------------------------------------------
    @property
    def trains_posterior(self) -> bool:
        return self.posterior is not None and any(True for _ in self.posterior.parameters())

    def configure_optimizers(self):
        # The objective's own parameters (NCE's log-normaliser) are learned with the energy.
        energy_params = [*self.model.parameters(), *self.objective.parameters()]
        optimizers = [self.optim.optimizer(energy_params, self.optim.lr)]
        if self.trains_posterior:
            optimizers.append(self.optim.optimizer(self.posterior.parameters(), self.optim.posterior_lr, "posterior"))
        return optimizers, self._schedulers(optimizers)

    def _schedulers(self, optimizers: list[torch.optim.Optimizer]) -> list:
        """Each optimizer's schedule over ``trainer.max_steps``, epochs counted in the datamodule's batches."""
        total_steps = max(int(self.trainer.max_steps), 1)
        datamodule = getattr(self.trainer, "datamodule", None)
        steps_per_epoch = None if datamodule is None else datamodule.batches_per_epoch(self.trainer.world_size)
        return [self.optim.scheduler_for(opt, total_steps, steps_per_epoch) for opt in optimizers]

    def posterior_optimizer(self) -> torch.optim.Optimizer | None:
        """q's optimizer, whose state the next lower steps continue (the gradient bias starts from it): the
        trainer's while it fits, else ``evaluation_optimizer`` (an ensemble member's, given by the ensemble); None
        when q has no weights."""
        if not self.trains_posterior:
            return None
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        return optimizers[1] if len(optimizers) > 1 else self.evaluation_optimizer

    def _as_list(self, things) -> list:
        return list(things) if isinstance(things, list | tuple) else [things]

    # training -------------------------------------------------------------------------------------------------
    def _grad_norm(self, params) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # one norm of all of them

    def _backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through Lightning's ``manual_backward`` where it does more than that: under DDP
        (gradient synchronisation) or a precision other than 32-bit (gradient scaling). On one process in float32
        the plain call skips Lightning's per-call precision and callback hooks (about 0.7 ms on a CPU, paid six
        times per BiSM iteration); no eblvm callback has a backward hook."""
        if self.trainer.world_size > 1 or type(self.trainer.precision_plugin) is not Precision:
            self.manual_backward(loss)
        else:
            loss.backward()

    def _finite(self, checks: list[tuple[str, torch.Tensor]]) -> bool:
        """Whether the iteration may step the energy: True when every checked loss and gradient norm is finite
        on every rank (one decision for all, so no rank steps while another stops). Otherwise ``stop`` raises
        ``DivergenceError`` naming the first non-finite quantity, and ``skip`` counts the dropped iteration
        (raising after too many in a row). The checks are stacked into one tensor, so deciding costs a single
        device-to-host copy per iteration."""
        finite = torch.isfinite(torch.stack([value for _, value in checks]))
        if self.trainer.strategy.reduce_boolean_decision(bool(finite.all()), all=True):
            return True
        bad = [(name, float(value)) for (name, value), ok in zip(checks, finite.tolist(), strict=True) if not ok]
        name, value = bad[0] if bad else ("loss or gradient on another rank", float("nan"))
        if self.on_nonfinite == "stop":
            raise DivergenceError(self.global_step, name, value)
        self.skipped_steps += 1
        self._consecutive_skips += 1
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise DivergenceError(
                self.global_step, f"{name} ({self._consecutive_skips} non-finite iterations in a row)", value
            )
        return False

    def _skip_snapshot(self, modules: list[nn.Module], optimizers, schedulers=()) -> dict[str, Any] | None:
        """Copies of ``modules``' weights and buffers and of the states of their (Lightning-wrapped) optimizers and
        schedulers, to restore when an iteration is skipped (only kept under ``on_nonfinite=skip``)."""
        if self.on_nonfinite != "skip":
            return None
        return copy.deepcopy(
            {
                "modules": [module.state_dict() for module in modules],
                "optimizers": [optimizer.optimizer.state_dict() for optimizer in optimizers],
                "schedulers": [scheduler.state_dict() for scheduler in schedulers],
            }
        )

    @staticmethod
    def _restore_snapshot(saved: dict[str, Any] | None, modules: list[nn.Module], optimizers, schedulers=()) -> None:
        """Put back what ``_skip_snapshot`` copied (nothing when it kept nothing)."""
        if saved is None:
            return
        for module, state in zip(modules, saved["modules"], strict=True):
            module.load_state_dict(state)
        for optimizer, state in zip(optimizers, saved["optimizers"], strict=True):
            optimizer.optimizer.load_state_dict(state)
        for scheduler, state in zip(schedulers, saved["schedulers"], strict=True):
            scheduler.load_state_dict(state)

    def _posterior_state(self, optimizer, scheduler) -> dict[str, Any] | None:
        """Copies of q's weights, optimizer and scheduler before the iteration (``_skip_snapshot``)."""
        return self._skip_snapshot([self.posterior], [optimizer], [scheduler]) if self.trains_posterior else None

    def _restore_posterior(self, saved: dict[str, Any] | None, optimizer, scheduler) -> None:
        self._restore_snapshot(saved, [self.posterior], [optimizer], [scheduler])

    def _lower_level(self, v: torch.Tensor, optimizer, scheduler) -> list[tuple[str, torch.Tensor]]:
        """``n_lower_steps`` steps of q with the energy held fixed (its weights detached, so DDP sees them unused);
        returns each step's loss and gradient norm for the iteration's finiteness check. A non-finite step is
        caught there, before the energy moves: ``skip`` then restores q, its optimizer and its schedule."""
        frozen, q = frozen_energy(self.model), BoundPosterior(self.posterior)
        q_params = list(self.posterior.parameters())
        checks = []
        for _ in range(self.objective.n_lower_steps):
            loss = self.objective.lower_loss(frozen, q, v, self.generator)
            optimizer.zero_grad(set_to_none=True)
            self._backward(loss)
            checks += [("lower loss", loss.detach()), ("lower gradient norm", self._grad_norm(q_params))]
            optimizer.optimizer.step()  # the raw optimizer: global_step counts energy steps only
        scheduler.step()
        return checks

    def _clip(self, optimizer) -> None:
        """Clip the energy's gradient norm to ``optim.clip_grad_norm``."""
        self.clip_gradients(optimizer, self.optim.clip_grad_norm, "norm")

    def _writes_log_row(self) -> bool:
        """Whether Lightning writes a row of logged metrics after this step (every ``trainer.log_every_n_steps``):
        training metrics are only gathered and logged then, not on every step."""
        return self.trainer._logger_connector.should_update_logs

    def training_step(self, v: torch.Tensor, batch_idx: int) -> None:
        optimizers = self._as_list(self.optimizers())
        schedulers = self._as_list(self.lr_schedulers())
        checks, saved, q = [], None, None
        if self.trains_posterior:
            saved = self._posterior_state(optimizers[1], schedulers[1])
            checks = self._lower_level(v, optimizers[1], schedulers[1])
            q = unroll(
                self.posterior,
                optimizers[1].optimizer,
                lambda q_unrolled: self.objective.lower_loss(self.model, q_unrolled, v, self.generator),
                self.objective.n_unroll,
            )
        elif self.posterior is not None:
            q = BoundPosterior(self.posterior)
        loss = self.objective.higher_loss(self.model, q, v, self.generator)
        optimizers[0].zero_grad(set_to_none=True)
        self._backward(loss)
        grad_norm = self._grad_norm(optimizers[0].param_groups[0]["params"])
        checks += [("higher loss", loss.detach()), ("higher gradient norm", grad_norm)]
        if not self._finite(checks):
            optimizers[0].zero_grad(set_to_none=True)
            if self.trains_posterior:
                self._restore_posterior(saved, optimizers[1], schedulers[1])
            return
        self._consecutive_skips = 0
        if self.optim.clip_grad_norm is not None:
            self._clip(optimizers[0])
        optimizers[0].step()
        schedulers[0].step()
        if self._writes_log_row():
            self._log_training(checks, optimizers[0], batch_size=v.shape[-2])

    def _log_training(
        self,
        checks: list[tuple[str, torch.Tensor]],
        optimizer,
        batch_size: int,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """The last lower step's loss and gradient norm, the higher loss, its gradient norm, the learning rate, and
        ``extra`` values as ``train/<name>``."""
        last = dict(checks)
        logs = {"train/loss": last["higher loss"], "train/grad_norm": last["higher gradient norm"]}
        if "lower loss" in last:
            logs |= {"train/lower_loss": last["lower loss"], "train/posterior_grad_norm": last["lower gradient norm"]}
        logs |= {f"train/{name}": value for name, value in (extra or {}).items()}
        logs["train/lr"] = torch.tensor(optimizer.param_groups[0]["lr"])
        if self.on_nonfinite == "skip":
            logs["train/skipped_steps"] = torch.tensor(float(self.skipped_steps))
        self.log_dict(logs, prog_bar=False, batch_size=batch_size)
        self.log("loss", last["higher loss"], prog_bar=True, logger=False, batch_size=batch_size)

    # evaluation: the objective on held-out data ----------------------------------------------------------------
    def _start_evaluation(self) -> None:
        self._validation_generator = self.evaluation_generator(VALIDATION_LOSS_STREAM)

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation()

    def on_test_epoch_start(self) -> None:
        self._start_evaluation()

    def _log_objective(self, stage: str, v: torch.Tensor) -> None:
        q = None if self.posterior is None else BoundPosterior.detached(self.posterior)
        with torch.enable_grad():
            value = self.objective.validation_loss(self.model, q, v, self._validation_generator).detach()
        self.log(f"{stage}/objective", value, batch_size=v.shape[0], sync_dist=True, prog_bar=stage == "val")

    def validation_step(self, v: torch.Tensor, batch_idx: int) -> None:
        self._log_objective("val", v)

    def test_step(self, v: torch.Tensor, batch_idx: int) -> None:
        self._log_objective("test", v)
