"""Lower-level losses as parts: fit ``q_φ(h|v)`` to the model's posterior using only ``E`` and ``q``.

Each is called as ``loss(energy, q, v, generator)`` and returns one value per row (shape ``(B,)``) so a caller
can weight rows (MDSM divides by ``σ_i``). Adding one: a subclass here and its entry in ``LOWER_LOSSES``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from eblvm.errors import require, require_count
from eblvm.posteriors.base import BoundPosterior

Energy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def importance_weighted_loss(
    energy: Energy, q: BoundPosterior, v: torch.Tensor, n_samples: int, generator: torch.Generator
) -> torch.Tensor:
    """IWAE bound on the unnormalised joint: ``−[logsumexp_k(−E(v,h_k) − log q(h_k|v)) − log k]``.

    ``h_k ~ q(·|v)`` reparameterised. With ``k = 1`` this is the negative ELBO, i.e. ``KL(q ‖ p(h|v))`` up to a
    constant in φ.
    """
    dist = q(v)
    sample = q.rsample(dist, n_samples, generator)
    if n_samples == 1:  # the ELBO: its one draw without the particle axis, so no broadcast is differentiated
        sample = sample.squeeze(0)
        h = q.latent(sample)
        return energy(v, h) + q.log_prob(sample, dist, h)
    h = q.latent(sample)
    log_weights = -energy(v, h) - q.log_prob(sample, dist, h)
    return -(torch.logsumexp(log_weights, dim=0) - math.log(n_samples))


class LowerLoss:
    """A loss for q; ``latent_types`` are the posteriors' latent kinds it works with."""

    name: str
    latent_types: tuple[str, ...] = ("binary", "continuous")

    def check_latent_type(self, latent_type: str | None) -> None:
        require(
            latent_type in self.latent_types,
            "objective.lower",
            self.name,
            f"needs {' or '.join(self.latent_types)} latents, the posterior's are {latent_type}: "
            f"use lower=elbo or lower=iwae",
        )

    def __call__(self, energy: Energy, q: BoundPosterior, v: torch.Tensor, generator: torch.Generator):
        raise NotImplementedError


class ELBO(LowerLoss):
    """The negative ELBO of the unnormalised joint, ``−[−E(v,h) − log q(h|v)]`` with one ``h ~ q(·|v)``:
    ``KL(q ‖ p(h|v))`` up to a constant in φ."""

    name = "elbo"

    def __call__(self, energy: Energy, q: BoundPosterior, v: torch.Tensor, generator: torch.Generator):
        return importance_weighted_loss(energy, q, v, 1, generator)


class IWAE(LowerLoss):
    """The importance-weighted bound with ``iwae_k`` samples (``importance_weighted_loss``)."""

    name = "iwae"

    def __init__(self, iwae_k: int = 5):
        require_count("iwae_k", iwae_k, 1)
        self.iwae_k = iwae_k

    def __call__(self, energy: Energy, q: BoundPosterior, v: torch.Tensor, generator: torch.Generator):
        return importance_weighted_loss(energy, q, v, self.iwae_k, generator)


class PosteriorFisher(LowerLoss):
    """Posterior Fisher divergence at one sample: ``½‖∇_h[−E(v,h) − log q(h|v)]‖²``, summed over latents.

    ``v`` is detached and ``h = μ_φ(v) + σ_φ(v)ε`` stays on φ's graph, so φ is differentiated through ``h`` and
    through ``q``'s parameters (double backprop through ``E``). For a Gaussian ``q`` the inner gradient is
    ``−∇_h E(v,h) + (h − μ)/σ²``. Continuous latents only.
    """

    name = "fisher"
    latent_types = ("continuous",)

    def __call__(self, energy: Energy, q: BoundPosterior, v: torch.Tensor, generator: torch.Generator):
        v = v.detach()
        dist = q(v)
        h = q.rsample(dist, 1, generator)
        (grad_h,) = torch.autograd.grad((-energy(v, h) - q.log_prob(h, dist)).sum(), h, create_graph=True)
        return 0.5 * (grad_h**2).sum(-1).squeeze(0)


LOWER_LOSSES: dict[str, type[LowerLoss]] = {"elbo": ELBO, "iwae": IWAE, "fisher": PosteriorFisher}
