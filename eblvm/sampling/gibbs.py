"""Block Gibbs sampling for models with a Gibbs sampler (``has_gibbs_sampler``: GRBMs)."""

from __future__ import annotations

import torch

from eblvm.models.base import EnergyModel


@torch.no_grad()
def gibbs_sample(
    model: EnergyModel,
    n_samples: int,
    n_sweeps: int = 1000,
    generator: torch.Generator | None = None,
    return_mean: bool = True,
) -> torch.Tensor:
    """Samples of ``v`` by ``n_sweeps`` sweeps ``v ~ p(v|h)``, ``h ~ p(h|v)``.

    Starts from ``v₀ ~ U[0,1]^d`` with ``h₀ = E[h|v₀]`` (probabilities) and returns ``E[v|h]`` of the last
    sweep (``return_mean=True``, the papers' figures) or the last ``v`` sample.
    """
    like = next(model.parameters())
    v = torch.rand((n_samples, model.v_dim), generator=generator, device=like.device, dtype=like.dtype)
    h = model.exact_posterior(v).mean
    for _ in range(n_sweeps):
        v = model.sample_visible(h, generator)
        h = model.sample_hidden(v, generator)
    return model.visible_mean(h) if return_mean else v
