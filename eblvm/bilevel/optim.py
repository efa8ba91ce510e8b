"""Optimizers and learning-rate schedules for the energy and the posterior, from the ``optim`` config."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from eblvm.errors import require, require_choice, require_count

Tensors = dict[str, torch.Tensor]

OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("const", "cosine", "step", "epoch")


def member_learning_rates(group: dict) -> float | torch.Tensor:
    """The group's learning rate: ``group["lr"]``, or in an ensemble's group, when its members have rates of their
    own (``lr_scale`` and ``lr_shift``) or some are masked (``member_mask``), each member's ``(a_k·lr + b_k)·mask_k``
    (tensors with one value per member).

    ``lr`` follows the schedule of the configured rate; ``a_k`` and ``b_k`` map it onto member ``k``'s schedule,
    exactly for the schedules eblvm has (each is affine in its initial rate; see ``OptimConfig.member_rates``),
    and a masked member's rate is 0, so its parameters stay as they are.
    """
    rates = group["lr"]
    if group.get("lr_scale") is not None:
        rates = group["lr_scale"] * rates + group["lr_shift"]
    if group.get("member_mask") is not None:
        rates = rates * group["member_mask"]
    return rates


def _per_member(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (S,) shaped to broadcast over a stacked tensor ``like`` (S, ...)."""
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


def _decayed_gradients(
    params: Tensors, grads: dict[str, torch.Tensor | None], group: dict
) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    """The names of the parameters that have a gradient (the others keep their value and state), their weights,
    and their gradients with coupled weight decay added (in an ensemble, zero for a masked member, so that no
    non-finite value reaches its state)."""
    names = [name for name in params if grads[name] is not None]
    weights = [params[name] for name in names]
    gradients = [grads[name] for name in names]
    if names and group["weight_decay"]:
        gradients = torch._foreach_add(gradients, weights, alpha=group["weight_decay"])
    if group.get("member_mask") is not None:  # after the decay, so that a masked member's gradient is zero
        mask = group["member_mask"]
        gradients = [torch.where(_per_member(mask, grad), grad, 0.0) for grad in gradients]
    return names, weights, gradients


def _foreach(op: str, tensors: list[torch.Tensor], *args, in_place: bool, **kwargs) -> list[torch.Tensor]:
    """``torch._foreach_<op>(tensors, *args, **kwargs)``: new tensors (differentiable), or with ``in_place`` the
    same tensors updated in place (a real step: no allocation, fewer passes over the weights)."""
    if in_place:
        getattr(torch, f"_foreach_{op}_")(tensors, *args, **kwargs)
        return tensors
    return getattr(torch, f"_foreach_{op}")(tensors, *args, **kwargs)


def _scaled(
    tensors: list[torch.Tensor], factors: list[float], rates: float | torch.Tensor, in_place: bool
) -> list[torch.Tensor]:
    """``tensors[i] · factors[i] · rates``, with ``rates`` a learning rate or an ensemble's one rate per member."""
    if isinstance(rates, torch.Tensor):
        scales = [_per_member(rates, t) * f for t, f in zip(tensors, factors, strict=True)]
        return _foreach("mul", tensors, scales, in_place=in_place)
    return _foreach("mul", tensors, [rates * factor for factor in factors], in_place=in_place)


def adam_step(
    params: Tensors,
    grads: dict[str, torch.Tensor | None],
    state: dict[str, Tensors],
    group: dict,
    sqrt_stabiliser: float = 0.0,
    in_place: bool = False,
):
    """One Adam step (``torch.optim.Adam`` semantics, coupled weight decay), differentiable in every term, or with
    ``in_place`` (a real step, under ``torch.no_grad``) applied to ``params`` and ``state``'s moments themselves.

    ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``, ``φ ← φ − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ) + δ) + eps)``,
    and ``δ = sqrt_stabiliser`` (0 for real steps, as in ``torch.optim.Adam``; the unroll sets a tiny one so its
    derivative stays finite). The preconditioner is not detached. A parameter without a gradient (None) keeps its
    value and its state, as ``torch.optim.Adam`` skips it. All parameters are updated together by tensor-list
    (``torch._foreach_*``) operations, nine per step whatever their number: ``m`` by one interpolation, and the
    bias corrections folded into scalars, ``φ − c₁·m / (√(v + δc₂) + eps·√c₂)`` with ``c₂ = 1−β₂ᵗ`` and
    ``c₁ = lr·√c₂/(1−β₁ᵗ)``, the same step in fewer passes over the weights (and fewer to differentiate).
    """
    beta1, beta2 = group["betas"]
    names, weights, gradients = _decayed_gradients(params, grads, group)
    new_params, new_state = dict(params), dict(state)
    if not names:
        return new_params, new_state
    steps = [state[name]["step"] + 1 for name in names]
    exp_avg = _foreach("lerp", [state[name]["exp_avg"] for name in names], gradients, 1 - beta1, in_place=in_place)
    exp_avg_sq = _foreach("mul", [state[name]["exp_avg_sq"] for name in names], beta2, in_place=in_place)
    exp_avg_sq = _foreach("addcmul", exp_avg_sq, gradients, gradients, 1 - beta2, in_place=in_place)
    corrections = [1 - beta2**step for step in steps]  # c₂
    denom = torch._foreach_add(exp_avg_sq, [sqrt_stabiliser * c2 for c2 in corrections])  # new tensors either way
    denom = _foreach("sqrt", denom, in_place=in_place)
    denom = _foreach("add", denom, [group["eps"] * math.sqrt(c2) for c2 in corrections], in_place=in_place)
    step_sizes = [-math.sqrt(c2) / (1 - beta1**step) for c2, step in zip(corrections, steps, strict=True)]
    # (torch._foreach_addcdiv with a list of scalars has no correct backward in torch 2.14: kept apart)
    update = _scaled(torch._foreach_div(exp_avg, denom), step_sizes, member_learning_rates(group), in_place)
    updated = _foreach("add", weights, update, in_place=in_place)
    for name, weight, step, m, v in zip(names, updated, steps, exp_avg, exp_avg_sq, strict=True):
        new_params[name] = weight
        new_state[name] = {"step": step, "exp_avg": m, "exp_avg_sq": v}
    return new_params, new_state


def sgd_step(
    params: Tensors,
    grads: dict[str, torch.Tensor | None],
    state: dict[str, Tensors],
    group: dict,
    in_place: bool = False,
):
    """One SGD step (``torch.optim.SGD`` semantics: weight decay, momentum with dampening, Nesterov), by
    tensor-list operations, differentiable, or with ``in_place`` (a real step) applied to ``params`` and the
    momentum buffers themselves; a parameter without a gradient (None) keeps its value and its momentum, as
    ``torch.optim.SGD`` skips it."""
    names, weights, directions = _decayed_gradients(params, grads, group)
    new_params, new_state = dict(params), dict(state)
    if not names:
        return new_params, new_state
    buffers = [state[name].get("momentum_buffer") for name in names]
    if group["momentum"]:
        momentum, dampening = group["momentum"], group["dampening"]

        def next_buffer(grad: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
            """``b ← μb + (1 − dampening)g``, ``b ← g`` at the first step."""
            if buffer is None:
                return grad.clone() if in_place else grad  # a kept buffer must not be the gradient tensor itself
            if in_place:
                return buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
            return torch.add(momentum * buffer, grad, alpha=1 - dampening)

        buffers = [next_buffer(grad, buffer) for grad, buffer in zip(directions, buffers, strict=True)]
        directions = torch._foreach_add(directions, buffers, alpha=momentum) if group["nesterov"] else buffers
    rates = member_learning_rates(group)
    if isinstance(rates, torch.Tensor):
        step = _scaled(directions, [-1.0] * len(directions), rates, in_place=False)
        updated = _foreach("add", weights, step, in_place=in_place)
    else:
        updated = _foreach("add", weights, directions, in_place=in_place, alpha=-rates)
    for name, weight, buffer in zip(names, updated, buffers, strict=True):
        new_params[name] = weight
        new_state[name] = {"momentum_buffer": buffer}
    return new_params, new_state


class _ListOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose ``step`` is one of the functional rules above, applied in place.

    The unroll differentiates the same functions, so a real step and an unrolled one follow one rule. One step
    costs about ten in-place tensor-list operations. ``torch.optim``'s own step costs more here, even fused: on a
    CUDA build without a GPU it asks ``torch.cuda.is_available()`` on every step (graph-capture check), which
    under Lightning's NVML-based check loads the NVML library each time, and the K lower steps of every iteration
    pay that K times. A subclass names its ``rule`` and gives a parameter's state (``_state``), initial or kept.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            params = {index: p for index, p in enumerate(group["params"]) if p.grad is not None}
            if not params:
                continue
            grads = {index: p.grad for index, p in params.items()}
            state = {index: self._state(p) for index, p in params.items()}
            _, new_state = self.rule(params, grads, state, group, in_place=True)
            for index, p in params.items():
                self.state[p] = new_state[index]
        return loss


class Adam(_ListOptimizer):
    """``torch.optim.Adam`` (coupled weight decay, no AMSGrad) stepped by ``adam_step``; its state has Adam's keys
    (``step``, ``exp_avg``, ``exp_avg_sq``)."""

    rule = staticmethod(adam_step)

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _state(self, param: torch.Tensor) -> Tensors:
        state = self.state.get(param)
        if not state:
            return {"step": 0.0, "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}
        return {**state, "step": float(state["step"])}


class SGD(_ListOptimizer):
    """``torch.optim.SGD`` (momentum with dampening, Nesterov, coupled weight decay) stepped by ``sgd_step``."""

    rule = staticmethod(sgd_step)

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        defaults = {"lr": lr, "momentum": momentum, "dampening": 0.0, "nesterov": False, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def _state(self, param: torch.Tensor) -> Tensors:
        return self.state.get(param) or {"momentum_buffer": None}


@dataclass(frozen=True)
class OptimConfig:
    """``optim.*``: one optimizer type for both levels, each with its own learning rate and schedule.

    The energy's optimizer takes ``lr``, ``betas`` and ``weight_decay`` (coupled, as ``torch.optim.Adam``'s); the
    posterior's ``posterior_lr`` and ``posterior_betas`` and ``posterior_weight_decay``, each the energy's value
    when null. A generator (BiDVL) is stepped with the posterior by the same optimizer, or by a third one with
    ``generator_lr`` when that is set (the posterior's betas and weight decay). ``scheduler=cosine`` anneals to
    ``min_lr`` over all training steps; ``step`` multiplies by ``gamma`` every ``step_size`` steps, ``epoch`` every
    epoch (its steps counted from the data, the batch size and the number of processes). Schedules step once per
    iteration. ``clip_grad_norm`` (off by default, as in the papers)
    clips the energy's gradient norm.
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
    posterior_betas: tuple[float, float] | None = None
    posterior_weight_decay: float | None = None
    generator_lr: float | None = None

    def __post_init__(self):
        require_choice("name", self.name, OPTIMIZERS)
        require_choice("scheduler", self.scheduler, SCHEDULERS)
        for key in ("lr", "posterior_lr", "eps"):
            require(getattr(self, key) > 0, key, getattr(self, key), "must be > 0")
        require(
            self.generator_lr is None or self.generator_lr > 0,
            "generator_lr",
            self.generator_lr,
            "must be > 0, or null to step the generator with the posterior's optimizer",
        )
        for key in ("betas", "posterior_betas"):
            betas = getattr(self, key)
            require(
                (betas is None and key == "posterior_betas") or (len(betas) == 2 and all(0 <= b < 1 for b in betas)),
                key,
                betas,
                "two in [0, 1)" + (", or null for optim.betas" if key == "posterior_betas" else ""),
            )
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(
            self.posterior_weight_decay is None or self.posterior_weight_decay >= 0,
            "posterior_weight_decay",
            self.posterior_weight_decay,
            "must be >= 0, or null for optim.weight_decay",
        )
        require(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        require_count("step_size", self.step_size, 1)
        require(
            self.clip_grad_norm is None or self.clip_grad_norm > 0,
            "clip_grad_norm",
            self.clip_grad_norm,
            "must be > 0, or null to disable clipping",
        )

    def member_rates(self, key: str, member_lrs: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)``, one value per member, with ``a_k·r(t) + b_k`` member ``k``'s learning rate at every step when
        ``r(t)`` is the schedule starting from this config's ``key`` (``lr`` or ``posterior_lr``;
        ``member_learning_rates``).

        Every schedule here is affine in its initial rate, ``r(t) = m + (lr − m)·c(t)`` with ``m = min_lr`` for
        ``cosine`` and 0 for ``const`` and ``step``; so ``a_k = (lr_k − m)/(lr − m)`` and ``b_k = m(1 − a_k)``.
        """
        lr = getattr(self, key)
        if all(member_lr == lr for member_lr in member_lrs):
            return torch.ones(len(member_lrs)), torch.zeros(len(member_lrs))
        floor = self.min_lr if self.scheduler == "cosine" else 0.0
        require(lr != floor, key, lr, f"must differ from optim.min_lr={floor} for members to have rates of their own")
        scale = torch.tensor([(member_lr - floor) / (lr - floor) for member_lr in member_lrs])
        return scale, floor * (1 - scale)

    def optimizer(self, params, lr: float, level: str = "energy") -> torch.optim.Optimizer:
        """The optimizer of ``params`` at learning rate ``lr``, with the betas and weight decay of ``level``
        (``energy``, or ``posterior`` for the posterior's and a generator's)."""
        require_choice("level", level, ("energy", "posterior"))
        betas, weight_decay = self.betas, self.weight_decay
        if level == "posterior":
            betas = self.betas if self.posterior_betas is None else self.posterior_betas
            weight_decay = self.weight_decay if self.posterior_weight_decay is None else self.posterior_weight_decay
        if self.name == "adam":
            return Adam(params, lr=lr, betas=betas, eps=self.eps, weight_decay=weight_decay)
        return SGD(params, lr=lr, momentum=self.momentum, weight_decay=weight_decay)

    def scheduler_for(self, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int | None = None):
        """The schedule of ``optimizer`` over ``total_steps`` iterations; ``epoch`` needs ``steps_per_epoch``."""
        if self.scheduler == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=self.min_lr)
        if self.scheduler in ("step", "epoch"):
            step_size = self.step_size if self.scheduler == "step" else steps_per_epoch
            require(
                step_size is not None and step_size >= 1,
                "scheduler",
                self.scheduler,
                "decays once per epoch, and this run's training data give no epoch length: use scheduler=step",
            )
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=self.gamma)
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
