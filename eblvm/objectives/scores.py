"""Score estimators: functions ``v ↦ ∇_v log p(v)`` built with ``create_graph=True``.

Every score-matching loss takes one of these, so "BiDSM" is DSM with the ``bism`` estimator and "DSM" is DSM
with the ``exact`` one. A score function takes ``v`` of shape ``(B, d)`` that requires grad and returns
``(B, d)`` or ``(L, B, d)`` (one score per posterior particle); losses average over the leading axes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import functional_call

from eblvm.models.base import EnergyModel
from eblvm.posteriors.base import BoundPosterior

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
Energy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def frozen_energy(model: EnergyModel) -> Energy:
    """``E(v, h)`` with the model's parameters detached: what the lower level sees while θ is held fixed."""
    detached = {name: p.detach() for name, p in model.named_parameters()}
    return lambda v, h: functional_call(model, detached, (v, h))


def exact_score(model: EnergyModel) -> ScoreFn:
    """The model's exact marginal score ``−∇_v F(v)`` (models with a tractable free energy)."""
    return model.score


def bism_score(energy: Energy, q: BoundPosterior, generator: torch.Generator, n_particles: int = 1) -> ScoreFn:
    """BiSM's estimate ``s(v) = ∇_v [−E(v,h) − log q(h|v)]`` with ``h ~ q(·|v̄)``, ``v̄ = v`` detached.

    ``h`` is reparameterised (a function of φ) but drawn at the detached ``v``, so the derivative in ``v`` sees
    only the explicit dependence of ``E`` and ``log q``. With ``n_particles = L > 1`` it returns one score per
    particle, shape ``(L, B, d)``. If ``q`` is the true posterior, every particle gives the exact score.
    """

    def score(v: torch.Tensor) -> torch.Tensor:
        h = q.rsample(q(v.detach()), n_particles, generator)
        v_per_particle = v.expand((n_particles,) + v.shape)
        log_joint = -energy(v_per_particle, h) - q.log_prob(h, q(v_per_particle))
        (grad,) = torch.autograd.grad(log_joint.sum(), v_per_particle, create_graph=True)
        return grad

    return score
