"""Small models with closed-form posteriors, for tests."""

from __future__ import annotations

import torch
from torch import nn

from eblvm.models import EnergyModel


class GaussianLinear(EnergyModel):
    """``E(v,h) = ½‖v − Ah‖² + ½‖h‖²``: ``p(h|v) = N(ΣAᵀv, Σ)`` with ``Σ = (I + AᵀA)⁻¹``."""

    latent_type = "continuous"

    def __init__(self, v_dim: int, h_dim: int):
        super().__init__()
        self.v_dim, self.h_dim = v_dim, h_dim
        self.A = nn.Parameter(torch.randn(v_dim, h_dim) / h_dim**0.5)

    def forward(self, v, h):
        return 0.5 * ((v - h @ self.A.T) ** 2).sum(-1) + 0.5 * (h**2).sum(-1)

    def posterior_mean_and_cov(self, v):
        cov = torch.linalg.inv(torch.eye(self.h_dim) + self.A.T @ self.A)
        return v @ self.A @ cov, cov
