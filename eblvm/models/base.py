"""What every energy model offers the objectives, samplers and metrics, and what some can do besides."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from eblvm.errors import require, require_count


class EnergyModel(nn.Module):
    """An energy ``E(v, h)`` over visible ``v`` and latent ``h``, evaluated by ``forward(v, h)``.

    Shapes broadcast: ``v`` is ``(..., B, d)`` and ``h`` is ``(..., B, m)`` (a leading axis holds posterior
    particles); the result is ``(..., B)``.

    Capabilities. Objectives, samplers and the evaluation callbacks ask a model what it can do through these
    flags, never through its class; a model that sets a flag implements the methods named beside it:

    - ``has_free_energy``: ``free_energy(v)``, so the exact score ``−∇_v F`` (``score``) exists;
    - ``has_exact_log_partition``: ``log_partition()``, the exact ``log Z`` (with ``has_free_energy``: an exact
      log-likelihood);
    - ``has_ais``: ``ais_log_partition(n_temperatures, n_chains, generator)``, an AIS estimate of ``log Z``;
    - ``has_gibbs_sampler``: ``sample_hidden(v)``, ``sample_visible(h)`` and ``visible_mean(h)`` (CD, PCD, Gibbs
      sampling);
    - ``has_exact_posterior``: ``exact_posterior(v)``, the true ``p(h|v)`` as a ``torch.distributions`` object,
      to compare a variational posterior with;
    - ``image_shape``: ``(C, H, W)`` when ``v`` holds flattened images (sample grids, FID), else None;
    - ensembles (docs/methods.md §9): ``member_broadcast`` when every method computes S members at once from
      parameters stacked in member-broadcast shapes (``eblvm.members.stack``) and row tensors ``(..., S, B, x)``;
      otherwise ``member_methods``, the methods an ensemble maps over its members with ``torch.func.vmap``, each
      with where the member axis goes in its outputs (``eblvm.noise.ROWS`` or ``VALUES``), the other methods
      reaching the parameters only through those. A model with neither trains alone.
    """

    latent_type: str = "continuous"  # "binary" or "continuous": the posteriors it can be paired with
    has_free_energy: bool = False
    has_exact_log_partition: bool = False
    has_ais: bool = False
    has_gibbs_sampler: bool = False
    has_exact_posterior: bool = False
    image_shape: tuple[int, int, int] | None = None
    member_broadcast: bool = False
    member_methods: dict[str, int] = {}
    v_dim: int
    h_dim: int

    def _keep_sizes(self, v_dim: int, h_dim: int, sigma_init: float) -> None:
        """Check and keep ``v_dim`` and ``h_dim`` (and check the ``sigma_init`` of ``_add_log_sigma``)."""
        require_count("v_dim", v_dim, 1)
        require_count("h_dim", h_dim, 1)
        require(sigma_init > 0, "sigma_init", sigma_init, "must be > 0")
        self.v_dim, self.h_dim = v_dim, h_dim

    def _add_log_sigma(self, sigma_shape: tuple[int, ...], learn_sigma: bool, sigma_init: float) -> None:
        """``log_sigma`` of ``sigma_shape`` starting at ``log(sigma_init)``: a parameter, or a buffer when
        ``learn_sigma`` is false (registered last, after the model's other weights)."""
        log_sigma = torch.full(sigma_shape, math.log(sigma_init))
        if learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    def conditional_energy(self, v: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``h ↦ E(v, h)`` for fixed rows ``v``, for evaluating many ``h`` (VaES's latent refinement); a model whose
        energy has a part that depends on ``v`` alone computes it once here."""
        return lambda h: self(v, h)

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """``F(v) = −log ∫ exp(−E(v, h)) dh``, shape ``(..., B)``."""
        raise NotImplementedError(f"{type(self).__name__} has no tractable free energy")

    def score(self, v: torch.Tensor) -> torch.Tensor:
        """Exact marginal score ``∇_v log p(v) = −∇_v F(v)``, differentiable in the parameters and in ``v``."""
        if not v.requires_grad:
            v = v.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.free_energy(v).sum(), v, create_graph=True)
        return -grad

    def log_partition(self) -> torch.Tensor:
        """The exact ``log Z = log ∫∫ exp(−E(v, h)) dv dh``."""
        raise NotImplementedError(f"{type(self).__name__} has no exact log-partition")

    def exact_posterior(self, v: torch.Tensor) -> torch.distributions.Distribution:
        """The model's posterior ``p(h|v)`` for rows ``v`` (batch shape ``(B,)``, event shape ``(m,)``)."""
        raise NotImplementedError(f"{type(self).__name__} has no exact posterior")
