"""Linear-Gaussian EBLVM (factor analysis): an exact testbed with continuous latents (docs/methods.md §2.4)."""

from __future__ import annotations

import math

import torch
from torch import nn

from eblvm.models.base import EnergyModel
from eblvm.noise import ROWS, VALUES


class GaussianLinear(EnergyModel):
    """``E(v,h) = ½‖v − Ah − b‖²/σ² + ½‖h‖²`` with continuous ``h ∈ R^m``, ``A`` (d×m), ``b`` (d) and one σ.

    Everything is closed form. With ``r = v − b``, ``P = I_m + AᵀA/σ²`` and ``C = σ²I_d + AAᵀ``:

    - posterior ``h | v ~ N(μ(v), P⁻¹)`` with ``μ(v) = P⁻¹Aᵀr/σ²``;
    - free energy ``F(v) = ½ rᵀC⁻¹r + ½ log|P| − (m/2) log 2π``, computed through the m×m Cholesky factor
      ``P = LLᵀ`` (Woodbury: ``rᵀC⁻¹r = ‖r‖²/σ² − ‖L⁻¹Aᵀr‖²/σ⁴``);
    - score ``−∇_v F(v) = −C⁻¹r = −(r − Aμ(v))/σ²``;
    - ``log Z = (d/2) log(2πσ²) + (m/2) log 2π`` (``A`` and ``b`` drop out, as ``|C| = σ^{2d}|P|``), so
      ``−F(v) − log Z = log N(v; b, C)``, the factor-analysis marginal.

    Initialisation in the spirit of the GRBM's: ``A`` and ``b`` uniform in ``±1/√m``; ``log σ`` starts at
    ``log(sigma_init)`` and is learned unless ``learn_sigma`` is false. No AIS and no Gibbs sampler: ``log Z`` is
    exact, and samples for figures would come from Langevin (none are drawn for vector models without Gibbs).
    """

    latent_type = "continuous"
    has_free_energy = True
    has_exact_log_partition = True
    has_exact_posterior = True
    # the posterior covariance (m×m, one per member) stacks as (S, m, m), third from the end like a row tensor
    member_methods = {
        "forward": VALUES,
        "free_energy": VALUES,
        "score": ROWS,
        "posterior_mean_and_covariance": ROWS,
    }

    def __init__(self, v_dim: int, h_dim: int, learn_sigma: bool = True, sigma_init: float = 1.0):
        super().__init__()
        self._keep_sizes(v_dim, h_dim, sigma_init)
        bound = 1.0 / math.sqrt(h_dim)
        self.A = nn.Parameter(torch.empty(v_dim, h_dim).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.empty(v_dim).uniform_(-bound, bound))
        self._add_log_sigma((), learn_sigma, sigma_init)

    @property
    def variance(self) -> torch.Tensor:
        return torch.exp(2 * self.log_sigma)

    def forward(self, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        residual = v - h @ self.A.T - self.b
        return 0.5 * (residual**2).sum(-1) / self.variance + 0.5 * (h**2).sum(-1)

    def precision_cholesky(self) -> torch.Tensor:
        """The lower Cholesky factor ``L`` of the posterior precision ``P = I + AᵀA/σ² = LLᵀ`` (m×m)."""
        eye = torch.eye(self.h_dim, dtype=self.A.dtype, device=self.A.device)
        return torch.linalg.cholesky(eye + self.A.T @ self.A / self.variance)

    def _projection(self, v: torch.Tensor) -> torch.Tensor:
        """``Aᵀr/σ²`` for rows ``v`` (shape ``(..., B, m)``)."""
        return (v - self.b) @ self.A / self.variance

    def posterior_mean_and_covariance(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``μ(v) = P⁻¹Aᵀr/σ²`` (shape ``(..., B, m)``) and ``P⁻¹`` (m×m, the same for every row)."""
        chol = self.precision_cholesky()
        mean = torch.cholesky_solve(self._projection(v).unsqueeze(-1), chol).squeeze(-1)
        return mean, torch.cholesky_inverse(chol)

    def exact_posterior(self, v: torch.Tensor) -> torch.distributions.Distribution:
        """``p(h|v) = N(P⁻¹Aᵀr/σ², P⁻¹)`` (batch ``(B,)``, event ``(m,)``)."""
        mean, covariance = self.posterior_mean_and_covariance(v)
        return torch.distributions.MultivariateNormal(mean, scale_tril=torch.linalg.cholesky(covariance))

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        chol = self.precision_cholesky()
        r = v - self.b
        whitened = torch.linalg.solve_triangular(chol, (r @ self.A).unsqueeze(-1), upper=False).squeeze(-1)
        quadratic = (r**2).sum(-1) / self.variance - (whitened**2).sum(-1) / self.variance**2  # rᵀC⁻¹r
        half_log_det_p = torch.log(torch.diagonal(chol)).sum()
        return 0.5 * quadratic + half_log_det_p - 0.5 * self.h_dim * math.log(2 * math.pi)

    def score(self, v: torch.Tensor) -> torch.Tensor:
        """``∇_v log p(v) = −C⁻¹(v − b) = −(v − b − Aμ(v))/σ²`` in closed form."""
        mean, _ = self.posterior_mean_and_covariance(v)
        return -(v - self.b - mean @ self.A.T) / self.variance

    def log_partition(self) -> torch.Tensor:
        """``log Z = (d/2) log(2πσ²) + (m/2) log 2π``."""
        return self.v_dim * self.log_sigma + 0.5 * (self.v_dim + self.h_dim) * math.log(2 * math.pi)
