"""One objective for the score-matching family: a score estimator, a score-matching loss and, when the
estimator uses a posterior, a lower loss that fits it."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from eblvm.errors import ConfigError, require, require_choice, require_count
from eblvm.members import batch_mean
from eblvm.models.base import EnergyModel
from eblvm.objectives.base import Objective
from eblvm.objectives.estimators import ESTIMATORS, Energy, ExactScore, ScoreEstimator
from eblvm.objectives.lower import LOWER_LOSSES, LowerLoss
from eblvm.objectives.score_losses import SCORE_LOSSES, ScoreLoss
from eblvm.posteriors.base import BoundPosterior

# The config key that selects each kind of part, and the registry it selects from.
PART_REGISTRIES: dict[str, dict[str, type]] = {"estimator": ESTIMATORS, "higher": SCORE_LOSSES, "lower": LOWER_LOSSES}


def _part_keys(part: type) -> list[str]:
    return [name for name in inspect.signature(part.__init__).parameters if name != "self"]


def _build_part(kind: str, choice: str | Any, settings: dict[str, Any]):
    """The part named ``choice`` in ``kind``'s registry, given the ``settings`` its constructor takes (a part
    object is used as it is)."""
    if not isinstance(choice, str):
        return choice
    registry = PART_REGISTRIES[kind]
    require_choice(kind, choice, tuple(registry))
    part = registry[choice]
    return part(**{key: value for key, value in settings.items() if key in _part_keys(part)})


class ScoreMatching(Objective):
    """A score-matching objective: which loss (``higher``) applied to which score (``estimator``).

    - ``estimator=exact``: the model's exact score ``−∇F``; the plain SM/SSM/DSM/MDSM baselines.
    - ``estimator=bism``: BiSM's variational score ``∇_v[−E − log q]``; q is fitted by the ``lower`` loss
      (``elbo``, ``iwae`` with ``iwae_k`` samples, or ``fisher``) in ``n_lower_steps`` real optimizer steps
      (the paper's K) and ``n_unroll`` differentiable ones (the paper's N) per energy step.
    - ``estimator=vaes|vages``: VaES's score from detached particles of q, and VaGES's gradient with its
      covariance term (docs/methods.md §4); q is fitted by plain alternation (``n_unroll`` must be 0).
    - ``estimator=importance``: the score of an importance-sampled free energy (IS-KSD's baseline).

    ``higher``, ``estimator`` and ``lower`` are names in ``SCORE_LOSSES``, ``ESTIMATORS`` and ``LOWER_LOSSES`` (or
    part objects); every other keyword is a setting of one of those parts (``sigma`` of ``dsm``, ``n_particles``
    of ``bism``, ``iwae_k`` of ``iwae``…), and each part takes the ones its constructor names. The lower loss sees
    the input the higher one perturbs to (fresh noise; clean data for SM/SSM), its rows weighted by the higher
    loss's ``row_weights`` (``1/σ_i`` for MDSM).
    """

    def __init__(
        self,
        higher: str | ScoreLoss = "dsm",
        estimator: str | ScoreEstimator = "exact",
        lower: str | LowerLoss = "elbo",
        n_lower_steps: int = 5,
        n_unroll: int = 5,
        **settings: Any,
    ):
        super().__init__()
        known = {key for registry in PART_REGISTRIES.values() for part in registry.values() for key in _part_keys(part)}
        for key in settings:
            if key not in known:
                raise ConfigError(
                    key,
                    settings[key],
                    "ScoreMatching takes no such key; its keys are higher, estimator, lower, n_lower_steps, "
                    f"n_unroll, {', '.join(sorted(known))}",
                )
        for key, value in (("n_lower_steps", n_lower_steps), ("n_unroll", n_unroll)):
            require_count(key, value, 0)
        self.loss: ScoreLoss = _build_part("higher", higher, settings)
        self.estimator: ScoreEstimator = _build_part("estimator", estimator, settings)
        self.lower: LowerLoss | None = _build_part("lower", lower, settings) if self.needs_posterior else None
        self.estimator.check_loss(self.loss)
        require(
            not self.needs_posterior or n_unroll == 0 or self.estimator.differentiates_posterior,
            "n_unroll",
            n_unroll,
            f"the {self.estimator.name} estimator's particles are detached from q, so unrolled steps would change "
            "nothing: set objective.n_unroll=0",
        )
        self.n_lower_steps, self.n_unroll = n_lower_steps, n_unroll

    @property
    def needs_posterior(self) -> bool:
        return self.estimator.needs_posterior

    def with_estimator(self, estimator: ScoreEstimator) -> ScoreMatching:
        """The same loss, lower loss and step counts with another score estimator (the exact one, for the
        gradient bias)."""
        return ScoreMatching(self.loss, estimator, self.lower or "elbo", self.n_lower_steps, self.n_unroll)

    def with_exact_score(self) -> ScoreMatching:
        return self.with_estimator(ExactScore())

    def check_model(self, model: EnergyModel, latent_type: str | None) -> None:
        """Refuse pairings that cannot work: exact scores need ``F``; ``fisher`` needs continuous latents."""
        self.estimator.check_model(model)
        if self.lower is not None:
            self.lower.check_latent_type(latent_type)

    def higher_loss(
        self, model: EnergyModel, q: BoundPosterior | None, v: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """The energy's loss for batch ``v`` with posterior weights ``q`` (ignored by the exact estimator)."""
        return self.estimator.higher_loss(model, q, self.loss, v, generator)

    def lower_loss(self, energy: Energy, q: BoundPosterior, v: torch.Tensor, generator: torch.Generator):
        """q's loss on the input the higher level uses (fresh noise for DSM/MDSM; rows weighted for MDSM)."""
        perturbation = self.loss.perturb(v, generator)
        per_row = self.lower(energy, q, perturbation.inputs, generator)
        weights = self.loss.row_weights(perturbation)
        return batch_mean(per_row if weights is None else per_row * weights, v)
