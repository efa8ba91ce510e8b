"""Differentiable (unrolled) optimizer steps on a posterior's weights, continuing its real optimizer.

The unroll starts from q's weights detached (views of them, which it never writes to) and copies of its optimizer
state, takes ``n_steps`` steps on the lower loss with ``create_graph=True``, and returns the final weights ``φ_N`` as
functions of the energy's parameters θ, so the higher loss's gradient holds the hypergradient through ``φ_N(θ)``.
The real posterior and its optimizer are never modified.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from eblvm.bilevel.optim import SGD, Adam, adam_step, sgd_step
from eblvm.posteriors.base import BoundPosterior, Posterior

Tensors = dict[str, torch.Tensor]

# Inside Adam's square root in the unroll: keeps d√v/dv finite where the second moment is exactly zero.
SQRT_STABILISER = 1e-16

# Options of torch's Adam and SGD whose update rule the unroll does not reproduce.
UNSUPPORTED_OPTIONS = ("amsgrad", "maximize", "decoupled_weight_decay")


def _param_group(optimizer: torch.optim.Optimizer) -> dict:
    if len(optimizer.param_groups) != 1:
        raise ValueError(f"the unroll expects one parameter group, got {len(optimizer.param_groups)}")
    group = optimizer.param_groups[0]
    for option in UNSUPPORTED_OPTIONS:
        if group.get(option):
            raise ValueError(f"cannot unroll {type(optimizer).__name__}({option}=True): its update is not reproduced")
    return group


def adam_state(optimizer: torch.optim.Adam, named_params: dict[str, torch.nn.Parameter]) -> dict[str, Tensors]:
    """Detached copies of Adam's moments and step count (zeros before its first step)."""
    state = {}
    for name, param in named_params.items():
        real = optimizer.state.get(param, {})
        state[name] = {
            "step": float(real["step"]) if "step" in real else 0.0,
            "exp_avg": real["exp_avg"].detach().clone() if "exp_avg" in real else torch.zeros_like(param),
            "exp_avg_sq": real["exp_avg_sq"].detach().clone() if "exp_avg_sq" in real else torch.zeros_like(param),
        }
    return state


def sgd_state(optimizer: torch.optim.SGD, named_params: dict[str, torch.nn.Parameter]) -> dict[str, Tensors]:
    """Detached copies of SGD's momentum buffers (``None`` before its first step)."""
    state = {}
    for name, param in named_params.items():
        buffer = optimizer.state.get(param, {}).get("momentum_buffer")
        state[name] = {"momentum_buffer": None if buffer is None else buffer.detach().clone()}
    return state


def unroll(
    posterior: Posterior,
    optimizer: torch.optim.Optimizer,
    lower_loss: Callable[[BoundPosterior], torch.Tensor],
    n_steps: int,
) -> BoundPosterior:
    """``n_steps`` differentiable steps of ``optimizer``'s rule on ``lower_loss``, from q's current state.

    Returns q bound to the final weights. With ``n_steps = 0`` these are q's detached current weights (plain
    alternating training: no gradient reaches q from the higher loss).
    """
    if n_steps == 0:
        return BoundPosterior.detached(posterior)
    if type(optimizer) in (Adam, torch.optim.Adam):
        step_fn, state_fn = partial(adam_step, sqrt_stabiliser=SQRT_STABILISER), adam_state
    elif type(optimizer) in (SGD, torch.optim.SGD):
        step_fn, state_fn = sgd_step, sgd_state
    else:
        raise ValueError(f"cannot unroll {type(optimizer).__name__}: use optim.name=adam or optim.name=sgd")
    group = _param_group(optimizer)
    named = dict(posterior.named_parameters())
    state = state_fn(optimizer, named)
    params = {name: p.detach().requires_grad_(True) for name, p in named.items()}
    for _ in range(n_steps):
        loss = lower_loss(BoundPosterior(posterior, params))
        # an ensemble's loss has one value per member: their sum's gradient is each member's own
        grads = torch.autograd.grad(loss.sum(), list(params.values()), create_graph=True, allow_unused=True)
        params, state = step_fn(params, dict(zip(params, grads, strict=True)), state, group)
    return BoundPosterior(posterior, params)
