"""Gaussian posteriors over continuous latents."""

from __future__ import annotations

import math

import torch

from eblvm.errors import require
from eblvm.posteriors.base import Posterior, tanh_mlp


class GaussianMLPPosterior(Posterior):
    """``q_φ(h|v) = N(μ(v), diag σ(v)²)`` from a two-layer tanh MLP with mean and log-std heads."""

    latent_type = "continuous"

    def __init__(self, v_dim: int, h_dim: int, hidden_dim: int = 200):
        super().__init__()
        require(isinstance(h_dim, int) and h_dim >= 1, "h_dim", h_dim, "must be a positive integer")
        self.h_dim = h_dim
        self.net = tanh_mlp(v_dim, 2 * h_dim, hidden_dim)

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(v).chunk(2, dim=-1)
        return mean, log_std

    def rsample(self, dist, n_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, log_std = dist
        eps = torch.randn((n_samples,) + mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(log_std) * eps

    def log_prob(self, h: torch.Tensor, dist) -> torch.Tensor:
        mean, log_std = dist
        z = (h - mean) * torch.exp(-log_std)
        return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def mean(self, dist) -> torch.Tensor:
        return dist[0]
