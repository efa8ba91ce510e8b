"""Gaussian posteriors over continuous latents."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from eblvm import noise
from eblvm.errors import require, require_count
from eblvm.posteriors.base import Posterior, tanh_mlp


class GaussianPosterior(Posterior):
    """``q_φ(h|v) = N(μ(v), diag σ(v)²)``: subclasses give ``self.net`` mapping rows to ``[μ ; log σ]``."""

    latent_type = "continuous"
    net: nn.Module

    def __init__(self, h_dim: int):
        super().__init__()
        require_count("h_dim", h_dim, 1)
        self.h_dim = h_dim

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(v).chunk(2, dim=-1)
        return mean, log_std

    def rsample(self, dist, n_samples: int, generator: noise.Generator = None) -> torch.Tensor:
        mean, log_std = dist
        eps = noise.gaussian((n_samples,) + mean.shape, generator, mean)
        return mean + torch.exp(log_std) * eps

    def log_prob(self, sample: torch.Tensor, dist, h: torch.Tensor | None = None) -> torch.Tensor:
        mean, log_std = dist
        z = (sample - mean) * torch.exp(-log_std)
        return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def mean(self, dist) -> torch.Tensor:
        return dist[0]

    def distribution(self, dist) -> torch.distributions.Distribution:
        """``N(μ, diag σ²)`` as a multivariate normal, so it compares with full-covariance exact posteriors."""
        mean, log_std = dist
        return torch.distributions.MultivariateNormal(mean, scale_tril=torch.diag_embed(torch.exp(log_std)))


class GaussianMLPPosterior(GaussianPosterior):
    """Gaussian q from a two-layer tanh MLP (the papers' net for vector data)."""

    member_broadcast = True

    def __init__(self, v_dim: int, h_dim: int, hidden_dim: int = 200):
        super().__init__(h_dim)
        self.net = tanh_mlp(v_dim, 2 * h_dim, hidden_dim)


class ConvEncoder(nn.Module):
    """Three stride-2, padding-1 3×3 convolutions, each followed by LeakyReLU(0.2), then a linear layer to
    ``out_dim``; reads flat rows ``(..., C·H·W)`` of images ``image_shape`` and keeps the leading axes."""

    def __init__(self, image_shape: Sequence[int], out_dim: int, channels: Sequence[int] = (64, 128, 256)):
        super().__init__()
        self.image_shape = tuple(image_shape)
        layers: list[nn.Module] = []
        width, (height, breadth) = self.image_shape[0], self.image_shape[1:]
        for out_channels in channels:
            layers += [nn.Conv2d(width, out_channels, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            width, height, breadth = out_channels, (height + 1) // 2, (breadth + 1) // 2
        self.convs = nn.Sequential(*layers, nn.Flatten())
        self.linear = nn.Linear(width * height * breadth, out_dim)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        lead = v.shape[:-1]
        out = self.linear(self.convs(v.reshape(-1, *self.image_shape)))
        return out.reshape(*lead, out.shape[-1])


class GaussianConvPosterior(GaussianPosterior):
    """Gaussian q for images (docs/methods.md §1.5): a three-conv encoder with mean and unconstrained log-std heads."""

    def __init__(self, image_shape: Sequence[int] | None, h_dim: int, channels: Sequence[int] = (64, 128, 256)):
        require(
            image_shape is not None and len(image_shape) == 3,
            "data.image_shape",
            image_shape,
            "posterior=gaussian_conv needs image data: set data.image_shape to [channels, height, width]",
        )
        require(
            len(channels) == 3 and all(isinstance(c, int) and c >= 1 for c in channels),
            "channels",
            list(channels),
            "must be three positive integers",
        )
        super().__init__(h_dim)
        self.net = ConvEncoder(image_shape, 2 * h_dim, channels)
