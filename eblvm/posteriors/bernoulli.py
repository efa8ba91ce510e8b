"""Posteriors over binary latents: the relaxed-Bernoulli family and the exact GRBM posterior."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from eblvm.errors import require, require_choice
from eblvm.models.grbm import GRBM
from eblvm.posteriors.base import Posterior, tanh_mlp

LOG_PROB_FORMS = ("bernoulli", "concrete")
SAMPLE_KINDS = ("relaxed", "binary")


class BernoulliFamily(Posterior):
    """Factorised Bernoulli posteriors given by logits ``l(v)``, sampled through the Binary-Concrete relaxation.

    Relaxed sample: ``h = sigmoid((l + L)/τ)`` with ``L ~ Logistic(0, 1)`` (Gumbel-softmax over two classes).
    ``log_prob`` has two forms:

    - ``bernoulli`` (the BiSM authors' choice, default): the Bernoulli log-mass at the relaxed point,
      ``Σ_j h_j log σ(l_j) + (1 − h_j) log σ(−l_j)``. With the exact GRBM logits it makes
      ``−E(v,h) − log q(h|v) = −F(v)`` for every ``h ∈ [0,1]^m``, so BiSM's score is then exact.
    - ``concrete``: the exact Binary-Concrete density
      ``log τ + l − (τ+1)(log h + log(1−h)) − 2 log(e^l h^{−τ} + (1−h)^{−τ})``, the principled density of the
      relaxed sample (h is clamped into ``[1e-6, 1 − 1e-6]`` where a low temperature saturates it).
    """

    latent_type = "binary"

    def __init__(self, h_dim: int, temperature: float = 0.1, log_prob: str = "bernoulli", sample: str = "relaxed"):
        super().__init__()
        require(isinstance(h_dim, int) and h_dim >= 1, "h_dim", h_dim, "must be a positive integer")
        require(temperature > 0, "temperature", temperature, "must be > 0")
        require_choice("log_prob", log_prob, LOG_PROB_FORMS)
        require_choice("sample", sample, SAMPLE_KINDS)
        self.h_dim, self.temperature, self.log_prob_form, self.sample_kind = (
            h_dim,
            temperature,
            log_prob,
            sample,
        )

    def rsample(self, logits: torch.Tensor, n_samples: int, generator: torch.Generator | None = None):
        u = torch.rand((n_samples,) + logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        if self.sample_kind == "binary":
            return (u < torch.sigmoid(logits)).to(logits.dtype)
        u = u.clamp(torch.finfo(u.dtype).tiny, 1 - torch.finfo(u.dtype).eps)
        return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / self.temperature)

    def log_prob(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.log_prob_form == "bernoulli":
            return (h * F.logsigmoid(logits) + (1 - h) * F.logsigmoid(-logits)).sum(-1)
        tau = self.temperature
        h = h.clamp(1e-6, 1 - 1e-6)
        log_h, log_1mh = torch.log(h), torch.log1p(-h)
        log_norm = torch.logaddexp(logits - tau * log_h, -tau * log_1mh)
        return (math.log(tau) + logits - (tau + 1) * (log_h + log_1mh) - 2 * log_norm).sum(-1)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)


class RelaxedBernoulliPosterior(BernoulliFamily):
    """Learned relaxed-Bernoulli ``q_φ(h|v)`` with linear logits (``net=linear``) or a two-layer tanh MLP."""

    def __init__(
        self,
        v_dim: int,
        h_dim: int,
        temperature: float = 0.1,
        net: str = "linear",
        hidden_dim: int = 200,
        log_prob: str = "bernoulli",
    ):
        super().__init__(h_dim, temperature, log_prob, sample="relaxed")
        require_choice("net", net, ("linear", "mlp"))
        self.logits = nn.Linear(v_dim, h_dim) if net == "linear" else tanh_mlp(v_dim, h_dim, hidden_dim)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.logits(v)


class ExactGRBMPosterior(BernoulliFamily):
    """The GRBM's own posterior ``p(h_j=1|v) = sigmoid(c_j + (Wᵀv)_j)``: no weights of its own.

    For diagnostics and tests. Its logits follow the model's current parameters; ``sample=binary`` draws exact
    posterior samples, ``sample=relaxed`` relaxed ones with the exact logits.
    """

    def __init__(
        self,
        model: GRBM,
        h_dim: int | None = None,
        temperature: float = 0.1,
        log_prob: str = "bernoulli",
        sample: str = "binary",
    ):
        require(isinstance(model, GRBM), "model", type(model).__name__, "the exact posterior needs model=grbm")
        require(h_dim in (None, model.h_dim), "h_dim", h_dim, f"must equal model.h_dim={model.h_dim}")
        super().__init__(model.h_dim, temperature, log_prob, sample)
        self._hidden_logits = model.hidden_logits  # a bound method: the model's weights are not registered here

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self._hidden_logits(v)
