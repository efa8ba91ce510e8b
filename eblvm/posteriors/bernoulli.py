"""Posteriors over binary latents: the relaxed-Bernoulli family and the exact GRBM posterior."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from eblvm import noise
from eblvm.errors import require, require_choice, require_count
from eblvm.models.base import EnergyModel
from eblvm.posteriors.base import MemberLinear, Posterior, tanh_mlp

LOG_PROB_FORMS = ("bernoulli", "concrete")
SAMPLE_KINDS = ("relaxed", "binary")


class BernoulliFamily(Posterior):
    """Factorised Bernoulli posteriors given by logits ``l(v)``, sampled through the Binary-Concrete relaxation.

    A relaxed draw is its pre-sigmoid value ``x = (l + L)/τ`` with ``L ~ Logistic(0, 1)`` (Gumbel-softmax over
    two classes), and ``h = latent(x) = sigmoid(x)``; ``sample=binary`` draws ``h ∈ {0, 1}`` itself (exact
    posterior samples, not reparameterised). ``log_prob`` has two forms (docs/methods.md §1.5):

    - ``bernoulli`` (the BiSM authors' choice, default): the Bernoulli log-mass at the relaxed point,
      ``Σ_j h_j log σ(l_j) + (1 − h_j) log σ(−l_j)``. With the exact GRBM logits it makes
      ``−E(v,h) − log q(h|v) = −F(v)`` for every ``h ∈ [0,1]^m``, so BiSM's score is then exact.
    - ``concrete``: the exact Binary-Concrete density of ``h``, computed from ``x`` so that no saturated ``h``
      is clamped: ``Σ_j log τ + l_j − τx_j − 2 softplus(l_j − τx_j) − log σ(x_j) − log σ(−x_j)`` (the logistic
      density of ``x`` and the Jacobian of ``h = σ(x)``). Relaxed samples only.
    """

    latent_type = "binary"

    def __init__(self, h_dim: int, temperature: float = 0.1, log_prob: str = "bernoulli", sample: str = "relaxed"):
        super().__init__()
        require_count("h_dim", h_dim, 1)
        require(temperature > 0, "temperature", temperature, "must be > 0")
        require_choice("log_prob", log_prob, LOG_PROB_FORMS)
        require_choice("sample", sample, SAMPLE_KINDS)
        require(
            log_prob != "concrete" or sample == "relaxed",
            "log_prob",
            log_prob,
            "the Binary-Concrete density is that of relaxed samples: use sample=relaxed or log_prob=bernoulli",
        )
        self.h_dim, self.temperature, self.log_prob_form, self.sample_kind = (
            h_dim,
            temperature,
            log_prob,
            sample,
        )

    def rsample(self, logits: torch.Tensor, n_samples: int, generator: noise.Generator = None):
        u = noise.uniform((n_samples,) + logits.shape, generator, logits)
        if self.sample_kind == "binary":
            return (u < torch.sigmoid(logits)).to(logits.dtype)
        logistic = torch.logit(u.clamp_(torch.finfo(u.dtype).tiny, 1 - torch.finfo(u.dtype).eps))  # log u − log(1−u)
        return (logits + logistic) / self.temperature

    def latent(self, sample: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(sample) if self.sample_kind == "relaxed" else sample

    def log_prob(self, sample: torch.Tensor, logits: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        if self.log_prob_form == "bernoulli":
            h = self.latent(sample) if h is None else h
            # h log σ(l) + (1 − h) log σ(−l) = h l − softplus(l), since log σ(l) − log σ(−l) = l
            return (h * logits - F.softplus(logits)).sum(-1)
        tau, x = self.temperature, sample
        shifted = logits - tau * x
        log_density_x = math.log(tau) + shifted - 2 * F.softplus(shifted)
        return (log_density_x - F.logsigmoid(x) - F.logsigmoid(-x)).sum(-1)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def distribution(self, logits: torch.Tensor) -> torch.distributions.Distribution:
        """The Bernoulli posterior the logits define (a relaxed q is compared through its logits)."""
        return torch.distributions.Independent(torch.distributions.Bernoulli(logits=logits), 1)


class RelaxedBernoulliPosterior(BernoulliFamily):
    """Learned relaxed-Bernoulli ``q_φ(h|v)`` with linear logits (``net=linear``) or a two-layer tanh MLP."""

    member_broadcast = True

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
        self.logits = MemberLinear(v_dim, h_dim) if net == "linear" else tanh_mlp(v_dim, h_dim, hidden_dim)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.logits(v)


class ExactGRBMPosterior(BernoulliFamily):
    """A model's own factorised Bernoulli posterior, e.g. the GRBM's ``p(h_j=1|v) = sigmoid(c_j + (Wᵀv)_j)``:
    no weights of its own.

    For diagnostics and tests; any binary-latent model with an exact posterior whose logits it gives by
    ``hidden_logits(v)``. The logits follow the model's current parameters; ``sample=binary`` draws exact
    posterior samples, ``sample=relaxed`` relaxed ones with the exact logits.
    """

    def __init__(
        self,
        model: EnergyModel,
        h_dim: int | None = None,
        temperature: float = 0.1,
        log_prob: str = "bernoulli",
        sample: str = "binary",
    ):
        require(
            model.has_exact_posterior and model.latent_type == "binary" and hasattr(model, "hidden_logits"),
            "model",
            type(model).__name__,
            "has no exact Bernoulli posterior to use: posterior=grbm_exact needs e.g. model=grbm",
        )
        require(h_dim in (None, model.h_dim), "h_dim", h_dim, f"must equal model.h_dim={model.h_dim}")
        super().__init__(model.h_dim, temperature, log_prob, sample)
        self._hidden_logits = model.hidden_logits  # a bound method: the model's weights are not registered here

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self._hidden_logits(v)
