"""Block Gibbs sampling for Gaussian RBMs."""

from __future__ import annotations

import torch

from eblvm.models.grbm import GRBM


@torch.no_grad()
def gibbs_sample(
    model: GRBM,
    n_samples: int,
    n_sweeps: int = 1000,
    generator: torch.Generator | None = None,
    return_mean: bool = True,
) -> torch.Tensor:
    """Samples of ``v`` from a GRBM by ``n_sweeps`` sweeps ``v ~ p(v|h)``, ``h ~ p(h|v)``.

    Starts from ``v₀ ~ U[0,1]^d`` with ``h₀ = E[h|v₀]`` (probabilities) and returns ``E[v|h]`` of the last
    sweep (``return_mean=True``, the papers' figures) or the last ``v`` sample.
    """
    v = torch.rand((n_samples, model.v_dim), generator=generator, device=model.W.device, dtype=model.W.dtype)
    h = torch.sigmoid(model.hidden_logits(v))
    for _ in range(n_sweeps):
        v = model.sample_visible(h, generator)
        h = model.sample_hidden(v, generator)
    return model.visible_mean(h) if return_mean else v
