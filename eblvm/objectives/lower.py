"""Lower-level losses: fit ``q_φ(h|v)`` to the model posterior using only ``E`` and ``q``.

Each returns one value per row (shape ``(B,)``) so a caller can weight rows (MDSM divides by ``σ_i``).
"""

from __future__ import annotations

import math

import torch

from eblvm.objectives.scores import Energy
from eblvm.posteriors.base import BoundPosterior


def importance_weighted_loss(
    energy: Energy, q: BoundPosterior, v: torch.Tensor, n_samples: int, generator: torch.Generator
) -> torch.Tensor:
    """IWAE bound on the unnormalised joint: ``−[logsumexp_k(−E(v,h_k) − log q(h_k|v)) − log k]``.

    ``h_k ~ q(·|v)`` reparameterised. With ``k = 1`` this is the negative ELBO, i.e. ``KL(q ‖ p(h|v))`` up to a
    constant in φ.
    """
    dist = q(v)
    h = q.rsample(dist, n_samples, generator)
    log_weights = -energy(v, h) - q.log_prob(h, dist)
    return -(torch.logsumexp(log_weights, dim=0) - math.log(n_samples))


def posterior_fisher_loss(
    energy: Energy, q: BoundPosterior, v: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Posterior Fisher divergence at one sample: ``½‖∇_h[−E(v,h) − log q(h|v)]‖²``, summed over latents.

    ``v`` is detached and ``h = μ_φ(v) + σ_φ(v)ε`` stays on φ's graph, so φ is differentiated through ``h`` and
    through ``q``'s parameters (double backprop through ``E``). For a Gaussian ``q`` the inner gradient is
    ``−∇_h E(v,h) + (h − μ)/σ²``. Continuous latents only.
    """
    v = v.detach()
    dist = q(v)
    h = q.rsample(dist, 1, generator)
    (grad_h,) = torch.autograd.grad((-energy(v, h) - q.log_prob(h, dist)).sum(), h, create_graph=True)
    return 0.5 * (grad_h**2).sum(-1).squeeze(0)
