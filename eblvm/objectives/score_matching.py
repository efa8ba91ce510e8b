"""One objective class for the score-matching family: SM, SSM, DSM, MDSM with an exact or a BiSM score."""

from __future__ import annotations

import math

import torch

from eblvm.errors import require, require_choice
from eblvm.models.base import EnergyModel
from eblvm.objectives import higher as losses
from eblvm.objectives.base import Objective
from eblvm.objectives.lower import importance_weighted_loss, posterior_fisher_loss
from eblvm.objectives.scores import Energy, ScoreFn, bism_score, exact_score
from eblvm.posteriors.base import BoundPosterior

HIGHER_LOSSES = ("sm", "ssm", "dsm", "mdsm")
ESTIMATORS = ("exact", "bism")
LOWER_LOSSES = ("elbo", "iwae", "fisher")
NOISE_GRIDS = ("linear", "geometric")
PROBES = ("rademacher", "gaussian")


class ScoreMatching(Objective):
    """A score-matching objective: which loss (``higher``) applied to which score (``estimator``).

    - ``estimator=exact``: the model's exact score ``−∇F``; the plain SM/SSM/DSM/MDSM baselines.
    - ``estimator=bism``: BiSM's variational score ``∇_v[−E − log q]``; q is fitted by the ``lower`` loss
      (``elbo``, ``iwae`` with ``iwae_k`` samples, or ``fisher``) in ``n_lower_steps`` real optimizer steps
      (the paper's K) and ``n_unroll`` differentiable ones (the paper's N) per energy step.

    Noise: DSM perturbs with ``sigma``; MDSM draws one level per row from ``linspace(sigma_begin, sigma_end, B)``
    (``noise_grid=linear``) or its geometric counterpart, with target scale ``sigma0``. The lower loss sees the
    same kind of input as the higher one (noised data with fresh noise for DSM/MDSM, clean data for SM/SSM) and
    for MDSM each row's lower loss is divided by its ``σ_i``.
    """

    def __init__(
        self,
        higher: str = "dsm",
        estimator: str = "exact",
        sigma: float = 0.05,
        sigma_begin: float = 0.05,
        sigma_end: float = 1.2,
        noise_grid: str = "geometric",
        sigma0: float = 0.1,
        probe: str = "rademacher",
        lower: str = "elbo",
        iwae_k: int = 5,
        n_lower_steps: int = 5,
        n_unroll: int = 5,
        n_particles: int = 1,
    ):
        super().__init__()
        require_choice("higher", higher, HIGHER_LOSSES)
        require_choice("estimator", estimator, ESTIMATORS)
        require_choice("lower", lower, LOWER_LOSSES)
        require_choice("noise_grid", noise_grid, NOISE_GRIDS)
        require_choice("probe", probe, PROBES)
        for key, value in (("sigma", sigma), ("sigma_begin", sigma_begin), ("sigma0", sigma0)):
            require(value > 0, key, value, "noise levels must be > 0")
        require(sigma_end > sigma_begin, "sigma_end", sigma_end, f"must be > sigma_begin={sigma_begin}")
        for key, value, least in (("iwae_k", iwae_k, 1), ("n_particles", n_particles, 1)):
            require(isinstance(value, int) and value >= least, key, value, f"must be an integer >= {least}")
        for key, value in (("n_lower_steps", n_lower_steps), ("n_unroll", n_unroll)):
            require(isinstance(value, int) and value >= 0, key, value, "must be an integer >= 0")
        self.higher, self.estimator, self.lower = higher, estimator, lower
        self.sigma, self.sigma_begin, self.sigma_end, self.noise_grid = (
            sigma,
            sigma_begin,
            sigma_end,
            noise_grid,
        )
        self.sigma0, self.probe, self.iwae_k = sigma0, probe, iwae_k
        self.n_lower_steps, self.n_unroll, self.n_particles = n_lower_steps, n_unroll, n_particles

    @property
    def needs_posterior(self) -> bool:
        return self.estimator == "bism"

    @property
    def name(self) -> str:
        return ("bi" if self.needs_posterior else "") + self.higher

    def check_model(self, model: EnergyModel, latent_type: str | None) -> None:
        """Refuse pairings that cannot work: exact scores need ``F``; ``fisher`` needs continuous latents."""
        if not self.needs_posterior:
            require(
                model.has_free_energy,
                "objective.estimator",
                self.estimator,
                f"the exact score needs a tractable free energy, which {type(model).__name__} lacks: "
                "use objective=bism",
            )
        elif self.lower == "fisher":
            require(
                latent_type == "continuous",
                "objective.lower",
                self.lower,
                f"the posterior Fisher loss needs continuous latents, the posterior's are {latent_type}: "
                "use lower=elbo or lower=iwae",
            )

    # noise --------------------------------------------------------------------------------------------------
    def noise_levels(self, v: torch.Tensor) -> torch.Tensor:
        """Per-row noise level, shape ``(B, 1)``: constant for DSM, the MDSM grid for MDSM."""
        batch = v.shape[0]
        if self.higher == "dsm":
            return torch.full((batch, 1), self.sigma, device=v.device, dtype=v.dtype)
        if self.noise_grid == "linear":
            grid = torch.linspace(self.sigma_begin, self.sigma_end, batch, device=v.device, dtype=v.dtype)
        else:
            log_grid = torch.linspace(math.log(self.sigma_begin), math.log(self.sigma_end), batch)
            grid = torch.exp(log_grid).to(device=v.device, dtype=v.dtype)
        return grid[:, None]

    def _gaussian(self, v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(v.shape, generator=generator, device=v.device, dtype=v.dtype)

    def _probe(self, v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.probe == "gaussian":
            return self._gaussian(v, generator)
        bits = torch.randint(0, 2, v.shape, generator=generator, device=v.device)
        return (2 * bits - 1).to(v.dtype)

    # losses -------------------------------------------------------------------------------------------------
    def score_function(self, model: EnergyModel, q: BoundPosterior | None, generator: torch.Generator) -> ScoreFn:
        if self.estimator == "exact":
            return exact_score(model)
        return bism_score(model, q, generator, self.n_particles)

    def higher_loss(
        self, model: EnergyModel, q: BoundPosterior | None, v: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """The energy's loss for batch ``v`` with posterior weights ``q`` (ignored by the exact estimator)."""
        score_fn = self.score_function(model, q, generator)
        if self.higher == "sm":
            return losses.score_matching(score_fn, v)
        if self.higher == "ssm":
            return losses.sliced_score_matching(score_fn, v, self._probe(v, generator))
        sigma, eps = self.noise_levels(v), self._gaussian(v, generator)
        if self.higher == "dsm":
            return losses.denoising_score_matching(score_fn, v, sigma, eps)
        return losses.multiscale_denoising_score_matching(score_fn, v, sigma, eps, self.sigma0)

    def lower_loss(self, energy: Energy, q: BoundPosterior, v: torch.Tensor, generator: torch.Generator):
        """q's loss on the input the higher level uses (fresh noise for DSM/MDSM; rows ÷ σ_i for MDSM)."""
        weight = None
        if self.higher in ("dsm", "mdsm"):
            sigma = self.noise_levels(v)
            v = v + sigma * self._gaussian(v, generator)
            weight = 1 / sigma[:, 0] if self.higher == "mdsm" else None
        if self.lower == "fisher":
            per_row = posterior_fisher_loss(energy, q, v, generator)
        else:
            per_row = importance_weighted_loss(energy, q, v, self.iwae_k if self.lower == "iwae" else 1, generator)
        return (per_row if weight is None else per_row * weight).mean()
