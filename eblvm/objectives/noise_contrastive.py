"""Noise-contrastive estimation (NCE) and its variational version for latent-variable models (VNCE)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from eblvm import noise
from eblvm.errors import require_choice, require_count
from eblvm.members import batch_mean
from eblvm.objectives.base import Objective, require_free_energy
from eblvm.objectives.lower import importance_weighted_loss

NOISE_DISTRIBUTIONS = ("data_gaussian", "standard_normal")


class NoiseContrastiveEstimation(Objective):
    """NCE (Gutmann & Hyvärinen 2010) with a learned log-normaliser ``c``.

    ``loss = −[mean_v log σ(G(v)) + ν · mean_y log σ(−G(y))]``, ``G(x) = log p̃(x) − c − log ν − log p_n(x)``,
    ``ν`` noise samples ``y ~ p_n`` per data point (``noise_ratio``). For NCE ``log p̃(x) = −F(x)``. The noise is
    a diagonal Gaussian fitted to the training data (``data_gaussian``, default) or ``N(0, I)`` (the BiSM
    authors' choice, ``standard_normal``). ``c`` starts at 0, is trained with the energy, and at the optimum
    equals ``log Z``.
    """

    n_noise_particles: int = 1  # posterior samples behind log p̃(y) of a noise point (VNCE)

    def __init__(self, noise: str = "data_gaussian", noise_ratio: int = 1):
        super().__init__()
        require_choice("noise", noise, NOISE_DISTRIBUTIONS)
        require_count("noise_ratio", noise_ratio, 1)
        self.noise, self.noise_ratio = noise, noise_ratio
        self.log_normalizer = nn.Parameter(torch.zeros(()))
        self.register_buffer("noise_mean", torch.zeros(0))
        self.register_buffer("noise_std", torch.ones(0))

    def prepare(self, train_data: torch.Tensor) -> None:
        dim = train_data.shape[1]
        if self.noise == "data_gaussian":
            self.noise_mean, self.noise_std = train_data.mean(0), train_data.std(0).clamp_min(1e-3)
        else:
            self.noise_mean, self.noise_std = torch.zeros(dim), torch.ones(dim)

    def check_model(self, model, latent_type) -> None:
        require_free_energy(model, "nce")

    def _noise_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.noise_mean) / self.noise_std
        return (-0.5 * z**2 - torch.log(self.noise_std) - 0.5 * math.log(2 * math.pi)).sum(-1)

    def _noise_samples(self, v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        shape = v.shape[:-2] + (self.noise_ratio * v.shape[-2], v.shape[-1])
        return self.noise_mean + self.noise_std * noise.gaussian(shape, generator, v)

    def _logit(self, log_density: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # c has one value per member in an ensemble: it meets the per-row values (..., S, B) on the member axis
        return log_density - self.log_normalizer.unsqueeze(-1) - math.log(self.noise_ratio) - self._noise_log_prob(x)

    def log_density(self, model, q, x: torch.Tensor, n_particles: int, generator: torch.Generator):
        """``log p̃(x)``; NCE uses the exact ``−F(x)``."""
        return -model.free_energy(x)

    def higher_loss(self, model, q, v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = self._noise_samples(v, generator)
        data_logit = self._logit(self.log_density(model, q, v, 1, generator), v)
        noise_logit = self._logit(self.log_density(model, q, noise, self.n_noise_particles, generator), noise)
        return -(batch_mean(F.logsigmoid(data_logit), v) + self.noise_ratio * batch_mean(F.logsigmoid(-noise_logit), v))


class VariationalNCE(NoiseContrastiveEstimation):
    """VNCE (Rhodes & Gutmann 2019): NCE with ``log p̃(x)`` estimated through ``q(h|x)``.

    Data: ``log p̃(v) ≈ −E(v,h) − log q(h|v)`` with one ``h ~ q(·|v)``; noise:
    ``log p̃(y) ≈ logmeanexp_{m=1..M}[−E(y,h_m) − log q(h_m|y)]`` with ``M = n_particles``. q is held fixed inside
    this loss and trained by ``n_lower_steps`` ELBO steps per iteration on clean data, without unrolling.
    """

    needs_posterior = True

    def __init__(
        self, noise: str = "data_gaussian", noise_ratio: int = 1, n_particles: int = 5, n_lower_steps: int = 5
    ):
        super().__init__(noise, noise_ratio)
        require_count("n_particles", n_particles, 1)
        require_count("n_lower_steps", n_lower_steps, 0)
        self.n_noise_particles, self.n_lower_steps = n_particles, n_lower_steps

    def check_model(self, model, latent_type) -> None:
        """Any energy: VNCE needs no free energy."""

    def log_density(self, model, q, x: torch.Tensor, n_particles: int, generator: torch.Generator):
        dist = q(x)
        sample = q.rsample(dist, n_particles, generator)
        h = q.latent(sample)
        return torch.logsumexp(-model(x, h) - q.log_prob(sample, dist, h), dim=0) - math.log(n_particles)

    def lower_loss(self, energy, q, v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The negative ELBO on clean data: ``mean_v −[−E(v,h) − log q(h|v)]`` with one ``h ~ q(·|v)``."""
        return batch_mean(importance_weighted_loss(energy, q, v, 1, generator), v)
