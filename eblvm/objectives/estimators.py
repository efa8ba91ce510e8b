"""Score estimators: objects that turn a model (and a posterior) into a score ``v ↦ ∇_v log p(v)``.

Every score-matching loss takes the score through an estimator, so "BiDSM" is DSM with the ``bism`` estimator
and "DSM" is DSM with the ``exact`` one. A score function takes ``v`` of shape ``(B, d)`` that requires grad and
returns ``(B, d)`` or ``(L, B, d)`` (one score per posterior particle), built with ``create_graph=True`` so the
loss can be differentiated in the parameters; losses average over the leading axes.

An estimator forms the energy's loss through ``higher_loss(model, q, loss, v, generator)``. The estimators here
return a score function and let the loss differentiate through it; an estimator whose parameter gradient is not
the gradient of a score (a surrogate ``zᵀ·ĝ`` with the detached residual ``z`` of ``loss.residual``) overrides
``higher_loss`` instead.

Adding an estimator: a subclass here and its entry in ``ESTIMATORS``; ``objective.estimator=<name>`` then selects
it and its constructor's keys become ``objective.<key>``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import functional_call

from eblvm.errors import require
from eblvm.models.base import EnergyModel
from eblvm.objectives.score_losses import ScoreLoss
from eblvm.posteriors.base import BoundPosterior

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
Energy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def frozen_energy(model: EnergyModel) -> Energy:
    """``E(v, h)`` with the model's parameters detached: what the lower level sees while θ is held fixed."""
    detached = {name: p.detach() for name, p in model.named_parameters()}
    return lambda v, h: functional_call(model, detached, (v, h))


class ScoreEstimator:
    """How the score in a score-matching loss is obtained; ``needs_posterior`` says whether it uses ``q``."""

    name: str
    needs_posterior: bool = False

    def check_model(self, model: EnergyModel) -> None:
        """Raise ``ConfigError`` if this estimator cannot work with ``model``."""

    def score_function(self, model: EnergyModel, q: BoundPosterior | None, generator: torch.Generator) -> ScoreFn:
        raise NotImplementedError

    def higher_loss(
        self,
        model: EnergyModel,
        q: BoundPosterior | None,
        loss: ScoreLoss,
        v: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The energy's loss on batch ``v``: ``loss`` applied to this estimator's score."""
        return loss(self.score_function(model, q, generator), v, generator)


class ExactScore(ScoreEstimator):
    """The model's exact marginal score ``−∇_v F(v)`` (models with a tractable free energy)."""

    name = "exact"

    def check_model(self, model: EnergyModel) -> None:
        require(
            model.has_free_energy,
            "objective.estimator",
            self.name,
            f"the exact score needs a tractable free energy, which {type(model).__name__} lacks: use objective=bism",
        )

    def score_function(self, model: EnergyModel, q: BoundPosterior | None, generator: torch.Generator) -> ScoreFn:
        return model.score


class BiSMScore(ScoreEstimator):
    """BiSM's estimate ``s(v) = ∇_v [−E(v,h) − log q(h|v)]`` with ``h ~ q(·|v̄)``, ``v̄ = v`` detached
    (docs/methods.md §1.1).

    ``h`` is reparameterised (a function of φ) but drawn at the detached ``v``, so the derivative in ``v`` sees
    only the explicit dependence of ``E`` and ``log q``. With ``n_particles = L > 1`` the score has one row per
    particle, shape ``(L, B, d)``. If ``q`` is the true posterior, every particle gives the exact score.
    """

    name = "bism"
    needs_posterior = True

    def __init__(self, n_particles: int = 1):
        require(isinstance(n_particles, int) and n_particles >= 1, "n_particles", n_particles, "an integer >= 1")
        self.n_particles = n_particles

    def score_function(self, model: EnergyModel, q: BoundPosterior | None, generator: torch.Generator) -> ScoreFn:
        n_particles = self.n_particles

        def score(v: torch.Tensor) -> torch.Tensor:
            sample = q.rsample(q(v.detach()), n_particles, generator)
            v_per_particle = v.expand((n_particles,) + v.shape)
            h = q.latent(sample)
            log_joint = -model(v_per_particle, h) - q.log_prob(sample, q(v_per_particle), h)
            (grad,) = torch.autograd.grad(log_joint.sum(), v_per_particle, create_graph=True)
            return grad

        return score


ESTIMATORS: dict[str, type[ScoreEstimator]] = {"exact": ExactScore, "bism": BiSMScore}
