"""The exact full-covariance Gaussian posterior of a linear-Gaussian model, as a posterior module."""

from __future__ import annotations

import math

import torch

from eblvm import noise
from eblvm.errors import require
from eblvm.models.base import EnergyModel
from eblvm.posteriors.base import Posterior


class ExactGaussianLinearPosterior(Posterior):
    """A model's own Gaussian posterior ``p(h|v) = N(μ(v), Σ)``, e.g. the linear-Gaussian model's
    ``N(P⁻¹Aᵀ(v − b)/σ², P⁻¹)``: no weights of its own (the continuous-latent counterpart of
    ``ExactGRBMPosterior``).

    For diagnostics and tests; any continuous-latent model with an exact posterior whose mean and covariance it
    gives by ``posterior_mean_and_covariance(v)``. They follow the model's current parameters. ``forward(v)``
    returns ``(μ, L)``: the mean ``(..., B, m)`` and the lower Cholesky factor ``L`` of ``Σ = LLᵀ``, shape
    ``(1, m, m)`` (one for all rows; ``(S, 1, m, m)`` in an ensemble), broadcast against the mean. Draws are
    ``μ + Lε``, ``ε ~ N(0, I)``, so they are reparameterised in the model's parameters.
    """

    latent_type = "continuous"

    def __init__(self, model: EnergyModel, h_dim: int | None = None):
        require(
            model.has_exact_posterior
            and model.latent_type == "continuous"
            and callable(getattr(model, "posterior_mean_and_covariance", None)),
            "model",
            type(model).__name__,
            "has no exact Gaussian posterior to use: posterior=gaussian_linear_exact needs e.g. model=gaussian_linear",
        )
        require(h_dim in (None, model.h_dim), "h_dim", h_dim, f"must equal model.h_dim={model.h_dim}")
        super().__init__()
        self.h_dim = model.h_dim
        # a bound method: the model's weights are not registered here
        self._mean_and_covariance = model.posterior_mean_and_covariance

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, covariance = self._mean_and_covariance(v)
        return mean, torch.linalg.cholesky(covariance).unsqueeze(-3)

    def rsample(self, dist, n_samples: int, generator: noise.Generator = None) -> torch.Tensor:
        mean, scale_tril = dist
        eps = noise.gaussian((n_samples,) + mean.shape, generator, mean)
        return mean + (scale_tril @ eps.unsqueeze(-1)).squeeze(-1)

    def log_prob(self, sample: torch.Tensor, dist, h: torch.Tensor | None = None) -> torch.Tensor:
        """``log N(h; μ, LLᵀ) = −½‖L⁻¹(h − μ)‖² − Σ_j log L_jj − (m/2) log 2π``, over leading axes of ``h``."""
        mean, scale_tril = dist
        h = sample if h is None else h
        z = torch.linalg.solve_triangular(scale_tril, (h - mean).unsqueeze(-1), upper=False).squeeze(-1)
        half_log_det = torch.log(torch.diagonal(scale_tril, dim1=-2, dim2=-1)).sum(-1)
        return -0.5 * (z**2).sum(-1) - half_log_det - 0.5 * self.h_dim * math.log(2 * math.pi)

    def mean(self, dist) -> torch.Tensor:
        return dist[0]

    def distribution(self, dist) -> torch.distributions.Distribution:
        mean, scale_tril = dist
        return torch.distributions.MultivariateNormal(mean, scale_tril=scale_tril)
