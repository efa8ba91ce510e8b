"""The Lightning module: one bi-level iteration per batch, with manual optimization."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states

from eblvm.bilevel.optim import OptimConfig
from eblvm.bilevel.unroll import unroll
from eblvm.checkpoints import gather_rank_states, own_rank_state
from eblvm.errors import DivergenceError, require, require_choice
from eblvm.evaluation.images import image_quality
from eblvm.evaluation.likelihood import LogPartition, log_likelihood, log_partition
from eblvm.evaluation.plots import save_image_grid
from eblvm.evaluation.posterior import gradient_bias, posterior_gap
from eblvm.models.base import EnergyModel
from eblvm.models.grbm import GRBM
from eblvm.objectives.base import Objective
from eblvm.objectives.higher import score_matching
from eblvm.objectives.score_matching import ScoreMatching
from eblvm.objectives.scores import frozen_energy
from eblvm.posteriors.base import BoundPosterior, Posterior
from eblvm.posteriors.bernoulli import BernoulliFamily
from eblvm.sampling.draw import SamplingConfig, draw_samples

NONFINITE_POLICIES = ("stop", "skip")


@dataclass(frozen=True)
class EvalConfig:
    """``evaluation.*``: how log Z is computed (exact up to ``exact_max_h_dim`` hidden units, else AIS), and the
    gradient bias of BiSM (``gradient_bias_repeats`` noise and posterior draws on the first
    ``gradient_bias_batch`` validation rows; 0 repeats turns it off). For images: FID and KID of
    ``fid_samples`` samples against as many training images (0 turns them off) with the Inception weights file
    ``inception_weights``, and KID subsets of ``kid_subset_size``."""

    exact_max_h_dim: int = 20
    ais_temperatures: int = 1000
    ais_chains: int = 500
    gradient_bias_repeats: int = 20
    gradient_bias_batch: int = 100
    fid_samples: int = 0
    inception_weights: str | None = None
    kid_subset_size: int = 1000

    def __post_init__(self):
        for key in ("ais_temperatures", "ais_chains", "gradient_bias_batch", "kid_subset_size"):
            require(getattr(self, key) >= 2, key, getattr(self, key), "must be >= 2")
        for key in ("gradient_bias_repeats", "fid_samples"):
            require(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        if self.fid_samples:
            require(
                self.inception_weights is not None and Path(self.inception_weights).is_file(),
                "inception_weights",
                self.inception_weights,
                "FID needs the Inception weights file weights-inception-2015-12-05-6726825d.pth (see the README, "
                "'Image metrics'), or evaluation.fid_samples=0",
            )

    def log_partition(self, model: GRBM, generator: torch.Generator) -> LogPartition:
        return log_partition(model, self.exact_max_h_dim, self.ais_temperatures, self.ais_chains, generator)


class BilevelModule(pl.LightningModule):
    """Trains an energy model, and a variational posterior when the objective needs one.

    Per batch ``v`` (METHODS §1.4):

    1. ``n_lower_steps`` real steps of q on the lower loss with the energy held fixed, then q's scheduler step;
    2. ``n_unroll`` differentiable steps from detached copies of q's weights and optimizer state (``φ_N(θ)``);
    3. the higher loss with ``φ_N``, backward into θ only, optional clipping, one energy step and its schedule.

    Exact-score objectives skip 1–2. Every rank draws its own noise from a generator seeded ``seed + rank``;
    checkpoints hold every rank's generator state and the global random states, so a resumed run draws the same
    noise as an uninterrupted one. A non-finite loss or gradient is caught before the parameters are touched:
    ``on_nonfinite="stop"`` raises ``DivergenceError``; ``"skip"`` drops the iteration, counts it in
    ``train/skipped_steps`` and raises only after ``max_consecutive_skips`` dropped iterations in a row.
    """

    def __init__(
        self,
        model: EnergyModel,
        posterior: Posterior | None,
        objective: Objective,
        optim: OptimConfig,
        evaluation: EvalConfig,
        seed: int = 0,
        sampling: SamplingConfig | None = None,
        image_shape: tuple[int, int, int] | None = None,
        on_nonfinite: str = "stop",
        max_consecutive_skips: int = 10,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.posterior = posterior if objective.needs_posterior else None
        self.objective = objective
        self.optim = optim
        self.evaluation = evaluation
        self.seed = seed
        self.sampling = sampling or SamplingConfig()
        # deep energies on images: sample grids (and FID) at every validation; GRBMs draw figures at the end only
        self.image_shape = image_shape if not isinstance(model, GRBM) else None
        require_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
        require(max_consecutive_skips >= 1, "max_consecutive_skips", max_consecutive_skips, "must be >= 1")
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0
        self._consecutive_skips = 0
        self._generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None
        self._log_z: LogPartition | None = None
        self._clock: tuple[float, int] | None = None  # (time, global step) when training last resumed
        self._seconds_per_1000_steps: float | None = None

    # randomness -----------------------------------------------------------------------------------------------
    @property
    def generator(self) -> torch.Generator:
        """This rank's noise generator, created on the module's device and seeded ``seed + global_rank``."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(self.seed + self.global_rank)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
                self._generator_state = None
        return self._generator

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Called on every rank; rank 0 writes the file, so the per-rank generator states are gathered first."""
        checkpoint["eblvm_generator_states"] = gather_rank_states(self._trainer, self.generator.get_state())
        checkpoint["eblvm_global_rng_states"] = _collect_rng_states()
        checkpoint["eblvm_skipped_steps"] = (self.skipped_steps, self._consecutive_skips)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        own = own_rank_state(self._trainer, checkpoint.get("eblvm_generator_states"))
        self._generator, self._generator_state = None, own
        if "eblvm_global_rng_states" in checkpoint:
            _set_rng_states(checkpoint["eblvm_global_rng_states"])
        self.skipped_steps, self._consecutive_skips = checkpoint.get("eblvm_skipped_steps", (0, 0))

    def __getstate__(self):  # a generator is rebuilt in each process (spawned DDP workers included)
        state = super().__getstate__()
        state["_generator_state"] = None if self._generator is None else self._generator.get_state()
        state["_generator"] = None
        return state

    # optimizers -----------------------------------------------------------------------------------------------
    @property
    def trains_posterior(self) -> bool:
        return self.posterior is not None and any(True for _ in self.posterior.parameters())

    def configure_optimizers(self):
        total_steps = max(int(self.trainer.max_steps), 1)
        # The objective's own parameters (NCE's log-normaliser) are learned with the energy.
        energy_params = [*self.model.parameters(), *self.objective.parameters()]
        optimizers = [self.optim.optimizer(energy_params, self.optim.lr)]
        if self.trains_posterior:
            optimizers.append(self.optim.optimizer(self.posterior.parameters(), self.optim.posterior_lr))
        return optimizers, [self.optim.scheduler_for(opt, total_steps) for opt in optimizers]

    def _as_list(self, things) -> list:
        return list(things) if isinstance(things, list | tuple) else [things]

    # training -------------------------------------------------------------------------------------------------
    def _grad_norm(self, params) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)

    def _finite(self, quantity: str, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether the step may go on: True when the loss and gradient norm are finite. Otherwise ``stop`` raises
        ``DivergenceError`` and ``skip`` counts the dropped step (raising after too many in a row). Gradients are
        all-reduced, so every rank reaches the same decision."""
        bad = [(name, value) for name, value in ((f"{quantity} loss", loss), (f"{quantity} gradient norm", grad_norm))
               if not torch.isfinite(value)]  # fmt: skip
        if not bad:
            return True
        name, value = bad[0]
        if self.on_nonfinite == "stop":
            raise DivergenceError(self.global_step, name, float(value))
        self.skipped_steps += 1
        self._consecutive_skips += 1
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise DivergenceError(
                self.global_step, f"{name} ({self._consecutive_skips} non-finite iterations in a row)", float(value)
            )
        return False

    def _lower_level(self, v: torch.Tensor, optimizer, scheduler) -> dict[str, torch.Tensor] | None:
        """``n_lower_steps`` steps of q; None when a non-finite one was dropped (the iteration is skipped)."""
        frozen, q = frozen_energy(self.model), BoundPosterior(self.posterior)
        logs = {}
        for _ in range(self.objective.n_lower_steps):
            loss = self.objective.lower_loss(frozen, q, v, self.generator)
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            grad_norm = self._grad_norm(self.posterior.parameters())
            if not self._finite("lower", loss.detach(), grad_norm):
                optimizer.zero_grad(set_to_none=True)
                return None
            optimizer.optimizer.step()  # the raw optimizer: global_step counts energy steps only
            logs = {"train/lower_loss": loss.detach(), "train/posterior_grad_norm": grad_norm}
        scheduler.step()
        return logs

    def training_step(self, v: torch.Tensor, batch_idx: int) -> None:
        optimizers = self._as_list(self.optimizers())
        schedulers = self._as_list(self.lr_schedulers())
        logs = {}
        if self.trains_posterior:
            lower_logs = self._lower_level(v, optimizers[1], schedulers[1])
            if lower_logs is None:
                return
            logs.update(lower_logs)
            q = unroll(
                self.posterior,
                optimizers[1].optimizer,
                lambda q_unrolled: self.objective.lower_loss(self.model, q_unrolled, v, self.generator),
                self.objective.n_unroll,
            )
        else:
            q = None if self.posterior is None else BoundPosterior(self.posterior)
        loss = self.objective.higher_loss(self.model, q, v, self.generator)
        optimizers[0].zero_grad(set_to_none=True)
        self.manual_backward(loss)
        grad_norm = self._grad_norm(optimizers[0].param_groups[0]["params"])
        if not self._finite("higher", loss.detach(), grad_norm):
            optimizers[0].zero_grad(set_to_none=True)
            return
        self._consecutive_skips = 0
        if self.optim.clip_grad_norm is not None:
            self.clip_gradients(optimizers[0], self.optim.clip_grad_norm, "norm")
        optimizers[0].step()
        schedulers[0].step()
        logs.update({"train/loss": loss.detach(), "train/grad_norm": grad_norm})
        logs["train/lr"] = torch.tensor(optimizers[0].param_groups[0]["lr"])
        if self.on_nonfinite == "skip":
            logs["train/skipped_steps"] = torch.tensor(float(self.skipped_steps))
        self.log_dict(logs, prog_bar=False, batch_size=v.shape[0])
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=v.shape[0])

    # evaluation -----------------------------------------------------------------------------------------------
    def _start_evaluation(self) -> None:
        is_grbm = isinstance(self.model, GRBM)
        self._log_z = self.evaluation.log_partition(self.model, self.generator) if is_grbm else None

    @property
    def _measures_posterior(self) -> bool:
        """GRBM with a Bernoulli posterior: its gap to the exact posterior and BiSM's gradient bias exist."""
        return isinstance(self.model, GRBM) and isinstance(self.posterior, BernoulliFamily)

    def _gradient_bias(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """BiSM's energy-gradient bias at the current (θ, φ) and q-optimizer state (METHODS §8)."""
        optimizers = self._as_list(self.optimizers())
        result = gradient_bias(
            self.model,
            self.posterior,
            optimizers[1].optimizer if self.trains_posterior else None,
            self.objective,
            v[: self.evaluation.gradient_bias_batch],
            repeats=self.evaluation.gradient_bias_repeats,
            seed=self.seed + self.global_rank,
        )
        return {
            "gradient_bias": torch.tensor(result.bias),
            "gradient_bias_relative": torch.tensor(result.relative_bias),
            "gradient_bias_stderr": torch.tensor(result.stderr),
        }

    def evaluate_batch(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-batch metrics: the objective, the SM objective, the log-likelihood and posterior gap where they exist."""
        q = None if self.posterior is None else BoundPosterior.detached(self.posterior)
        with torch.enable_grad():
            metrics = {"objective": self.objective.validation_loss(self.model, q, v, self.generator).detach()}
            if isinstance(self.model, GRBM):  # one backward pass per dimension: for GRBMs (METHODS §8)
                metrics["sm_objective"] = score_matching(self.model.score, v).detach()
        if self._log_z is not None:
            metrics["log_likelihood"] = log_likelihood(self.model, v, self._log_z)
        if self._measures_posterior:
            metrics["posterior_gap"] = posterior_gap(self.model, self.posterior, v)
        return metrics

    def _log_evaluation(self, stage: str, v: torch.Tensor) -> None:
        metrics = {f"{stage}/{name}": value for name, value in self.evaluate_batch(v).items()}
        self.log_dict(metrics, batch_size=v.shape[0], sync_dist=True, prog_bar=stage == "val")

    def on_train_start(self) -> None:
        self._clock = (time.perf_counter(), self.global_step)

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation()
        if self._clock is not None:  # validation inside fit: time the training since the last one
            started, step = self._clock
            if self.global_step > step:
                self._seconds_per_1000_steps = 1000 * (time.perf_counter() - started) / (self.global_step - step)

    def on_validation_epoch_end(self) -> None:
        if self._clock is not None and self._seconds_per_1000_steps is not None:
            self.log("train/seconds_per_1000_steps", self._seconds_per_1000_steps, sync_dist=True)
            self._clock = (time.perf_counter(), self.global_step)

    def on_test_epoch_start(self) -> None:
        self._start_evaluation()

    def validation_step(self, v: torch.Tensor, batch_idx: int) -> None:
        self._log_evaluation("val", v)
        bism = isinstance(self.objective, ScoreMatching) and self.objective.needs_posterior
        if batch_idx == 0 and bism and self._measures_posterior and self.evaluation.gradient_bias_repeats:
            with torch.enable_grad():
                bias = self._gradient_bias(v)
            self.log_dict({f"val/{k}": value for k, value in bias.items()}, batch_size=1, sync_dist=True)

        if batch_idx == 0 and self.image_shape is not None:
            self._image_evaluation("val")

    def test_step(self, v: torch.Tensor, batch_idx: int) -> None:
        self._log_evaluation("test", v)
        if batch_idx == 0 and self.image_shape is not None:
            self._image_evaluation("test")

    def _image_evaluation(self, stage: str) -> None:
        """A grid of ``sampling.n_images`` samples saved as ``<run>/samples/<stage>_step<N>.png`` (and logged to
        W&B), and FID/KID when ``evaluation.fid_samples > 0``. Which mode and weights produced them is recorded
        in the run's hyperparameters and summary."""
        train = self.trainer.datamodule.train_data
        n_images, n_fid = self.sampling.n_images, self.evaluation.fid_samples
        rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed))[: max(n_images, n_fid)]
        reference = train[rows].to(self.device)

        def sample(reference_rows: torch.Tensor) -> torch.Tensor:
            images = draw_samples(
                self.model, self.posterior, self.sampling, len(reference_rows), self.generator, reference_rows
            )
            return images.reshape(-1, *self.image_shape)

        grid = sample(reference[:n_images])
        if self.global_rank == 0:
            path = Path(self.trainer.default_root_dir) / "samples" / f"{stage}_step{self.global_step:07d}.png"
            save_image_grid(grid.cpu(), path)
            for logger in self.loggers:
                if isinstance(logger, pl.loggers.WandbLogger):
                    logger.log_image(f"{stage}/samples", [str(path)], step=self.global_step)
        if n_fid:
            fakes = torch.cat([sample(chunk) for chunk in reference[:n_fid].split(n_images)])
            quality = image_quality(
                reference[:n_fid].reshape(-1, *self.image_shape).cpu(),
                fakes.clamp(0, 1).cpu(),  # Langevin samples may step outside the pixel range
                inception_weights=self.evaluation.inception_weights,
                kid_subset_size=self.evaluation.kid_subset_size,
            )
            self.log_dict({f"{stage}/{k}": float(value) for k, value in quality.items()}, batch_size=1, sync_dist=True)
