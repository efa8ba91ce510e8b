"""The variational posterior interface and a view of it with explicit parameters."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call

from eblvm import noise
from eblvm.noise import ROWS

Dist = torch.Tensor | tuple[torch.Tensor, ...]


class Posterior(nn.Module):
    """``q_φ(h|v)``: ``forward(v)`` returns the distribution's parameters (logits, or mean and log-std).

    Sampling and densities are pure functions of those parameters, so a posterior can be evaluated with
    unrolled copies of its weights (``torch.func.functional_call``) and still sample and score. A draw is kept
    in the coordinates its density is computed in (a relaxed Bernoulli keeps the pre-sigmoid value, which a low
    temperature would round away in ``h``); ``latent(sample)`` gives the ``h`` the energy takes.
    """

    latent_type: str = "continuous"
    # ensembles, as for EnergyModel: broadcast (all of its layers are MemberLinear), else forward through vmap
    member_broadcast: bool = False
    member_methods: dict[str, int] = {"forward": ROWS}
    h_dim: int

    def rsample(self, dist: Dist, n_samples: int, generator: noise.Generator = None) -> torch.Tensor:
        """``n_samples`` reparameterised draws, shape ``(n_samples, B, m)``."""
        raise NotImplementedError

    def latent(self, sample: torch.Tensor) -> torch.Tensor:
        """The latent ``h`` of a draw of ``rsample`` (the draw itself unless a subclass says otherwise)."""
        return sample

    def log_prob(self, sample: torch.Tensor, dist: Dist, h: torch.Tensor | None = None) -> torch.Tensor:
        """``log q(h|v)`` at ``h = latent(sample)``, summed over latent dimensions, broadcast over leading axes.

        ``h``: ``latent(sample)`` when the caller computed it already (for the energy), so both share one graph.
        """
        raise NotImplementedError

    def mean(self, dist: Dist) -> torch.Tensor:
        """``E_q[h|v]``, shape ``(B, m)``."""
        raise NotImplementedError

    def distribution(self, dist: Dist) -> torch.distributions.Distribution:
        """The distribution over ``h`` (batch ``(B,)``, event ``(m,)``) that the posterior gap compares with the
        model's exact posterior."""
        raise NotImplementedError


class BoundPosterior:
    """A posterior module evaluated with a given set of weights ``φ`` (a name → tensor mapping).

    The unroll produces weights that are functions of the energy's parameters; binding them here lets the
    losses treat the real module and its unrolled copy alike.
    """

    def __init__(self, module: Posterior, params: Mapping[str, torch.Tensor] | None = None):
        self.module = module
        self.params = params

    def __call__(self, v: torch.Tensor) -> Dist:
        if self.params is None:
            return self.module(v)
        return functional_call(self.module, dict(self.params), (v,))

    def rsample(self, dist: Dist, n_samples: int, generator: noise.Generator = None) -> torch.Tensor:
        return self.module.rsample(dist, n_samples, generator)

    def latent(self, sample: torch.Tensor) -> torch.Tensor:
        return self.module.latent(sample)

    def log_prob(self, sample: torch.Tensor, dist: Dist, h: torch.Tensor | None = None) -> torch.Tensor:
        return self.module.log_prob(sample, dist, h)

    def mean(self, dist: Dist) -> torch.Tensor:
        return self.module.mean(dist)

    @classmethod
    def detached(cls, module: Posterior) -> BoundPosterior:
        """The module's current weights, cut from their history: the higher loss never updates q itself."""
        return cls(module, {name: p.detach() for name, p in module.named_parameters()})


class MemberLinear(nn.Linear):
    """``nn.Linear`` (same initialisation and names) computed as ``x Wᵀ + b`` by broadcasting matrix products, so
    that an ensemble's stacked weights ``(S, out, in)`` and biases ``(S, 1, out)`` apply to rows ``(..., S, B, in)``
    member by member."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        product = x @ self.weight.mT
        return product if self.bias is None else product + self.bias


def tanh_mlp(in_dim: int, out_dim: int, hidden_dim: int = 200) -> nn.Sequential:
    """Two tanh layers of ``hidden_dim`` then a linear output layer (the papers' vector posterior net)."""
    return nn.Sequential(
        MemberLinear(in_dim, hidden_dim),
        nn.Tanh(),
        MemberLinear(hidden_dim, hidden_dim),
        nn.Tanh(),
        MemberLinear(hidden_dim, out_dim),
    )
