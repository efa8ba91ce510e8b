"""The Lightning module of BiDVL (docs/methods.md §5): the upper level first, then the lower level, with a generator.

It is ``BilevelModule`` with its own optimizers, iteration and validation loss: the training noise generators,
checkpoints of every rank's state, exact resume, the non-finite policy, the evaluation generators and the
evaluation callbacks are the same machinery.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from eblvm import noise
from eblvm.bilevel.module import BilevelModule
from eblvm.bilevel.optim import OptimConfig
from eblvm.models.base import EnergyModel
from eblvm.objectives.bidvl import BiDVL
from eblvm.objectives.estimators import frozen_energy
from eblvm.posteriors.base import Posterior


def batch_norm_statistics(module: nn.Module) -> list[torch.Tensor]:
    """The running means and variances of every batch-norm layer in ``module``."""
    return [
        buffer
        for layer in module.modules()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats
        for buffer in (layer.running_mean, layer.running_var)
    ]


class BidvlModule(BilevelModule):
    """Trains an energy ``E(v)``, an encoder ``q_ψ(h|v)`` (``posterior``) and a generator ``G_φ`` (``generator_net``).

    Per batch ``v``: draw ``ĥ ~ N(0, I)`` and ``v̂ = G(ĥ)``; (1) one energy step on the upper loss (v̂ detached),
    with optional clipping and its schedule; (2) ``n_lower_steps`` steps of the encoder and the generator on the
    lower loss with the updated energy held fixed, reusing ``ĥ`` (and the first step its ``v̂``, which the energy
    step leaves unchanged) or drawing ``ĥ′`` when ``objective.fresh_latent``. The encoder and the generator share
    one optimizer, or have one each when ``optim.generator_lr`` is set; every optimizer has its schedule.

    Under DDP each rank normalises with its own batch statistics, and after every iteration the batch-norm
    running statistics are averaged over the ranks, so every rank holds the same buffers (with equal batches this
    is the running mean that synchronised batch norm would keep). Spectral normalisation's power-iteration
    vectors follow from the weights alone, so they agree too; both are saved in checkpoints with the weights.

    Training metrics: the upper loss as ``train/loss`` (checks name it the higher loss, as for every objective),
    the lower loss and each of its terms. Non-finite values: the upper step is checked before the energy moves and
    each lower step before the encoder and generator move. ``skip`` drops the whole iteration when the upper step
    is non-finite, and only the lower level when a lower step is (the energy's step stands); either way the
    encoder, the generator (weights and batch-norm statistics) and their optimizers are put back as they were
    before the iteration, and every schedule steps with the energy's.
    """

    def __init__(
        self,
        model: EnergyModel,
        posterior: Posterior,
        generator_net: nn.Module,
        objective: BiDVL,
        optim: OptimConfig,
        seed: int = 0,
        on_nonfinite: str = "stop",
        max_consecutive_skips: int = 10,
        run_record: dict[str, Any] | None = None,
    ):
        super().__init__(model, posterior, objective, optim, seed, on_nonfinite, max_consecutive_skips, run_record)
        self.generator_net = generator_net

    def configure_optimizers(self):
        optim = self.optim
        optimizers = [optim.optimizer(self.model.parameters(), optim.lr)]
        if optim.generator_lr is None:
            lower = [*self.posterior.parameters(), *self.generator_net.parameters()]
            optimizers.append(optim.optimizer(lower, optim.posterior_lr, "posterior"))
        else:
            optimizers.append(optim.optimizer(self.posterior.parameters(), optim.posterior_lr, "posterior"))
            optimizers.append(optim.optimizer(self.generator_net.parameters(), optim.generator_lr, "posterior"))
        return optimizers, self._schedulers(optimizers)

    def _latent(self, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``ĥ ~ N(0, I)``, one per row of ``like``."""
        return noise.gaussian((*like.shape[:-1], self.posterior.h_dim), generator, like)

    def training_step(self, v: torch.Tensor, batch_idx: int) -> None:
        optimizers = self._as_list(self.optimizers())
        schedulers = self._as_list(self.lr_schedulers())
        saved = self._skip_snapshot(self._lower_networks(), optimizers[1:])
        latent = self._latent(v, self.generator)
        generated = self.generator_net(latent)
        upper = self.objective.upper_loss(self.model.free_energy, v, generated)
        optimizers[0].zero_grad(set_to_none=True)
        self._backward(upper)
        checks = [("higher loss", upper.detach()), ("higher gradient norm", self._grad_norm(self.model.parameters()))]
        if not self._finite(checks):
            optimizers[0].zero_grad(set_to_none=True)
            # the generator's batch-norm statistics saw the batch
            self._restore_snapshot(saved, self._lower_networks(), optimizers[1:])
            return
        if self.optim.clip_grad_norm is not None:
            self._clip(optimizers[0])
        optimizers[0].step()
        lower_checks, terms = self._encoder_generator_steps(v, latent, generated, optimizers[1:])
        if lower_checks is None:
            self._restore_snapshot(saved, self._lower_networks(), optimizers[1:])
        else:
            self._consecutive_skips = 0
        for scheduler in schedulers:  # every level's schedule follows the energy's steps
            scheduler.step()
        self._average_batch_norm_statistics()
        if self._writes_log_row():
            terms = {name: value.detach() for name, value in terms.items() if name != "loss"}
            self._log_training(checks + (lower_checks or []), optimizers[0], batch_size=v.shape[-2], extra=terms)

    def _lower_networks(self) -> list[nn.Module]:
        return [self.posterior, self.generator_net]

    def _encoder_generator_steps(self, v, latent, generated, optimizers):
        """``n_lower_steps`` steps of the encoder and the generator; returns the last step's checks and terms
        (checks None when a non-finite step was skipped)."""
        frozen = frozen_energy(self.model)
        energy = lambda rows: frozen(rows, None)  # noqa: E731 (the free energy with θ held fixed)
        params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
        checks, terms = None, {}
        for step in range(self.objective.n_lower_steps):
            if self.objective.fresh_latent:
                latent = self._latent(v, self.generator)
            if step > 0 or self.objective.fresh_latent:
                generated = self.generator_net(latent)
            terms = self.objective.lower_terms(
                energy, self.posterior, self.generator_net, v, latent, generated, self.generator
            )
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            self._backward(terms["loss"])
            checks = [("lower loss", terms["loss"].detach()), ("lower gradient norm", self._grad_norm(params))]
            if not self._finite(checks):
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                return None, terms
            for optimizer in optimizers:
                optimizer.optimizer.step()  # the raw optimizer: global_step counts energy steps only
        return checks, terms

    def _average_batch_norm_statistics(self) -> None:
        """Under DDP, every rank's batch-norm running statistics replaced by their mean over the ranks."""
        if self.trainer.world_size == 1:
            return
        statistics = batch_norm_statistics(self)
        if not statistics:
            return
        flat = torch.cat([buffer.flatten() for buffer in statistics])
        dist.all_reduce(flat)
        flat /= self.trainer.world_size
        parts = flat.split([buffer.numel() for buffer in statistics])
        torch._foreach_copy_(statistics, [part.view_as(buffer) for part, buffer in zip(parts, statistics, strict=True)])

    def _log_objective(self, stage: str, v: torch.Tensor) -> None:
        """``<stage>/objective``: the upper loss on held-out rows against generated images (the evaluation
        generator's ``ĥ``)."""
        with torch.no_grad():
            generated = self.generator_net(self._latent(v, self._validation_generator))
            value = self.objective.upper_loss(self.model.free_energy, v, generated)
        self.log(f"{stage}/objective", value, batch_size=v.shape[0], sync_dist=True, prog_bar=stage == "val")
