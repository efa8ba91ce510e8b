"""Gaussian restricted Boltzmann machine: the EBLVM whose marginal, posterior and partition are exact."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from eblvm import noise
from eblvm.errors import require
from eblvm.models.base import EnergyModel


class GRBM(EnergyModel):
    """``E(v,h) = ½ Σ_i (v_i − b_i)²/σ_i² − cᵀh − vᵀWh`` with binary ``h ∈ {0,1}^m``.

    The interaction is not divided by σ² (the BiSM papers' convention). Summing ``h`` out gives
    ``F(v) = ½ Σ_i (v_i − b_i)²/σ_i² − Σ_j softplus(c_j + (Wᵀv)_j)``. ``W``, ``b`` and ``c`` start uniform in
    ``±1/√m``; ``log σ`` starts at ``log(sigma_init)`` and is learned unless ``learn_sigma`` is false.
    """

    latent_type = "binary"
    has_free_energy = True
    has_exact_log_partition = True  # by enumerating 2^h_dim states: affordable up to h_dim of about 20
    has_ais = True
    has_gibbs_sampler = True
    has_exact_posterior = True
    member_broadcast = True

    def __init__(self, v_dim: int, h_dim: int, learn_sigma: bool = True, sigma_init: float = 1.0):
        super().__init__()
        self._keep_sizes(v_dim, h_dim, sigma_init)
        bound = 1.0 / math.sqrt(h_dim)
        self.W = nn.Parameter(torch.empty(v_dim, h_dim).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.empty(v_dim).uniform_(-bound, bound))
        self.c = nn.Parameter(torch.empty(h_dim).uniform_(-bound, bound))
        self._add_log_sigma((v_dim,), learn_sigma, sigma_init)

    @property
    def variance(self) -> torch.Tensor:
        return torch.exp(2 * self.log_sigma)

    def _quadratic(self, v: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((v - self.b) ** 2 / self.variance).sum(-1)

    def forward(self, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self._quadratic(v) - (h * self.hidden_logits(v)).sum(-1)  # cᵀh + vᵀWh = hᵀ(c + Wᵀv)

    def hidden_logits(self, v: torch.Tensor) -> torch.Tensor:
        """Logits of the exact posterior: ``p(h_j = 1 | v) = sigmoid(c_j + (Wᵀv)_j)``."""
        return self.c + v @ self.W

    def exact_posterior(self, v: torch.Tensor) -> torch.distributions.Distribution:
        """``p(h|v) = Π_j Bernoulli(sigmoid(c_j + (Wᵀv)_j))``."""
        return torch.distributions.Independent(torch.distributions.Bernoulli(logits=self.hidden_logits(v)), 1)

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        return self._quadratic(v) - F.softplus(self.hidden_logits(v)).sum(-1)

    def score(self, v: torch.Tensor) -> torch.Tensor:
        """``∇_v log p(v) = −(v − b)/σ² + W sigmoid(c + Wᵀv)`` in closed form."""
        return -(v - self.b) / self.variance + torch.sigmoid(self.hidden_logits(v)) @ self.W.mT

    def visible_mean(self, h: torch.Tensor) -> torch.Tensor:
        """``E[v | h] = b + σ² ⊙ (W h)``."""
        return self.b + self.variance * (h @ self.W.mT)

    def visible_from_noise(self, h: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``b + σ² ⊙ W h + σ ⊙ ε``: a draw of ``p(v|h)`` from standard normal ``ε``."""
        return self.visible_mean(h) + torch.exp(self.log_sigma) * eps

    def sample_visible(self, h: torch.Tensor, generator: noise.Generator = None) -> torch.Tensor:
        """``v ~ N(b + σ² ⊙ W h, diag σ²)``."""
        return self.visible_from_noise(h, noise.gaussian(h.shape[:-1] + (self.v_dim,), generator, h))

    def sample_hidden(self, v: torch.Tensor, generator: noise.Generator = None) -> torch.Tensor:
        """``h_j ~ Bernoulli(sigmoid(c_j + (Wᵀv)_j))``."""
        probs = torch.sigmoid(self.hidden_logits(v))
        return (noise.uniform(probs.shape, generator, v) < probs).to(v.dtype)

    def log_partition(self, chunk_size: int = 1 << 14) -> torch.Tensor:
        """Exact ``log Z`` by summing over all ``2^m`` hidden states, with ``v`` integrated out.

        With ``u = W h``: ``log Z = logsumexp_h [cᵀh + bᵀu + ½‖σ ⊙ u‖²] + Σ_i log σ_i + (d/2) log 2π``.
        Affordable up to ``m ≈ 20``; use AIS beyond that.
        """
        require(self.h_dim <= 24, "h_dim", self.h_dim, "exact log Z enumerates 2^h_dim states: use AIS above 24")
        n_states = 1 << self.h_dim
        bits = torch.arange(self.h_dim, device=self.W.device)
        chunks = []
        for start in range(0, n_states, chunk_size):
            index = torch.arange(start, min(start + chunk_size, n_states), device=self.W.device)
            h = ((index[:, None] >> bits) & 1).to(self.W.dtype)
            u = h @ self.W.T
            chunks.append(torch.logsumexp(h @ self.c + u @ self.b + 0.5 * (self.variance * u**2).sum(-1), 0))
        return torch.logsumexp(torch.stack(chunks), 0) + self.log_sigma.sum() + 0.5 * self.v_dim * math.log(2 * math.pi)

    @torch.no_grad()
    def ais_log_partition(
        self, n_temperatures: int = 1000, n_chains: int = 500, generator: torch.Generator | None = None
    ) -> tuple[float, float]:
        """AIS estimate of ``log Z`` and its standard error (Salakhutdinov & Murray 2008; docs/methods.md §2.1).

        Base model: ``W = 0, c = 0``, whose ``log Z₀ = Σ log σ_i + (d/2) log 2π + m log 2`` and whose visible
        marginal ``N(b, diag σ²)`` is sampled exactly. Intermediate models scale ``W`` and ``c`` by
        ``β_k = k/(K−1)``. For ``k = 1..K−1``: ``log w += F_{β_{k−1}}(v) − F_{β_k}(v)``, then one Gibbs sweep at
        ``β_k``. ``log Ẑ = logmeanexp(log w) + log Z₀``; its standard error is ``std(w)/(√n mean(w))`` (delta
        method). AIS is unbiased for ``Z``, so ``log Ẑ`` is biased low by roughly half its variance.
        """
        sigma = torch.exp(self.log_sigma)
        betas = torch.linspace(0, 1, n_temperatures, dtype=self.W.dtype, device=self.W.device)
        v = self.b + sigma * torch.randn(
            (n_chains, self.v_dim), generator=generator, device=self.W.device, dtype=self.W.dtype
        )
        log_w = torch.zeros(n_chains, device=v.device, dtype=v.dtype)
        for previous, beta in zip(betas[:-1], betas[1:], strict=True):
            logits = self.hidden_logits(v)
            log_w += (F.softplus(beta * logits) - F.softplus(previous * logits)).sum(-1)
            probs = torch.sigmoid(beta * logits)
            h = (torch.rand(probs.shape, generator=generator, device=v.device, dtype=v.dtype) < probs).to(v.dtype)
            noise = torch.randn(v.shape, generator=generator, device=v.device, dtype=v.dtype)
            v = self.b + self.variance * beta * (h @ self.W.T) + sigma * noise
        log_z0 = self.log_sigma.sum() + 0.5 * self.v_dim * math.log(2 * math.pi) + self.h_dim * math.log(2)
        log_mean_w = torch.logsumexp(log_w, 0) - math.log(n_chains)
        weights = torch.exp(log_w - log_w.max())
        stderr = weights.std() / (weights.mean() * math.sqrt(n_chains))
        return float(log_mean_w + log_z0), float(stderr)
