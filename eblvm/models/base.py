"""What every energy model offers the objectives, samplers and metrics."""

from __future__ import annotations

import torch
from torch import nn


class EnergyModel(nn.Module):
    """An energy ``E(v, h)`` over visible ``v`` and latent ``h``, evaluated by ``forward(v, h)``.

    Shapes broadcast: ``v`` is ``(..., B, d)`` and ``h`` is ``(..., B, m)`` (a leading axis holds posterior
    particles); the result is ``(..., B)``. Models whose latent can be summed out set ``has_free_energy`` and
    implement ``free_energy``; their exact score then comes for free.
    """

    latent_type: str = "continuous"  # "binary" or "continuous": the posteriors it can be paired with
    has_free_energy: bool = False
    v_dim: int
    h_dim: int

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """``F(v) = −log Σ_h exp(−E(v, h))``, shape ``(..., B)``."""
        raise NotImplementedError(f"{type(self).__name__} has no tractable free energy")

    def score(self, v: torch.Tensor) -> torch.Tensor:
        """Exact marginal score ``∇_v log p(v) = −∇_v F(v)``, differentiable in the parameters and in ``v``."""
        if not v.requires_grad:
            v = v.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.free_energy(v).sum(), v, create_graph=True)
        return -grad
