"""Optimizers and learning-rate schedules for the energy and the posterior, from the ``optim`` config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eblvm.errors import require, require_choice

OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("const", "cosine", "step")


@dataclass(frozen=True)
class OptimConfig:
    """``optim.*``: one optimizer type for both levels, each with its own learning rate and schedule.

    ``scheduler=cosine`` anneals to ``min_lr`` over all training steps; ``step`` multiplies by ``gamma`` every
    ``step_size`` steps. Schedules step once per iteration. ``clip_grad_norm`` (off by default, as in the
    papers) clips the energy's gradient norm.
    """

    name: str = "adam"
    lr: float = 1e-3
    posterior_lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    scheduler: str = "const"
    min_lr: float = 1e-6
    step_size: int = 1000
    gamma: float = 0.5
    clip_grad_norm: float | None = None

    def __post_init__(self):
        require_choice("name", self.name, OPTIMIZERS)
        require_choice("scheduler", self.scheduler, SCHEDULERS)
        for key in ("lr", "posterior_lr", "eps"):
            require(getattr(self, key) > 0, key, getattr(self, key), "must be > 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas, "two in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        require(self.step_size >= 1, "step_size", self.step_size, "must be >= 1")
        require(
            self.clip_grad_norm is None or self.clip_grad_norm > 0,
            "clip_grad_norm",
            self.clip_grad_norm,
            "must be > 0, or null to disable clipping",
        )

    def optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        if self.name == "adam":
            return torch.optim.Adam(
                params, lr=lr, betas=tuple(self.betas), eps=self.eps, weight_decay=self.weight_decay
            )
        return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def scheduler_for(self, optimizer: torch.optim.Optimizer, total_steps: int):
        if self.scheduler == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=self.min_lr)
        if self.scheduler == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.step_size, gamma=self.gamma)
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
