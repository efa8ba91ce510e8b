"""How far a variational posterior and BiSM's gradient are from the exact ones (models that have them)."""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Independent

from eblvm.bilevel.unroll import unroll
from eblvm.models.base import EnergyModel
from eblvm.objectives.estimators import fit_posterior
from eblvm.objectives.score_matching import ScoreMatching
from eblvm.posteriors.base import BoundPosterior, Posterior


def has_posterior_gap(model: EnergyModel, posterior: Posterior | None) -> bool:
    """Whether ``posterior_gap`` exists: the model has an exact posterior over the posterior's kind of latent."""
    return posterior is not None and model.has_exact_posterior and posterior.latent_type == model.latent_type


def _factorised_bernoulli_logits(dist: torch.distributions.Distribution) -> torch.Tensor | None:
    """The logits of a factorised Bernoulli (``Independent(Bernoulli)`` over the last axis), else None."""
    if isinstance(dist, Independent) and isinstance(dist.base_dist, Bernoulli) and dist.reinterpreted_batch_ndims == 1:
        return dist.base_dist.logits
    return None


def kl_divergence(q: torch.distributions.Distribution, p: torch.distributions.Distribution) -> torch.Tensor:
    """``KL(q ‖ p)`` by ``torch.distributions.kl_divergence``, except between factorised Bernoullis, whose
    divergence is computed from the logits ``a`` of q and ``b`` of p:
    ``Σ_j σ(a_j)(softplus(−b_j) − softplus(−a_j)) + σ(−a_j)(softplus(b_j) − softplus(a_j))``. torch's formula
    sets a term to inf where p's probability rounds to exactly 0 or 1 (float32 logits beyond about ±17), though the
    divergence is finite for all finite logits."""
    a, b = _factorised_bernoulli_logits(q), _factorised_bernoulli_logits(p)
    if a is None or b is None:
        return torch.distributions.kl_divergence(q, p)
    terms = torch.sigmoid(a) * (F.softplus(-b) - F.softplus(-a)) + torch.sigmoid(-a) * (F.softplus(b) - F.softplus(a))
    return terms.sum(-1)


@torch.no_grad()
def posterior_gap(model: EnergyModel, posterior: Posterior, v: torch.Tensor) -> torch.Tensor:
    """Mean ``KL(q(h|v) ‖ p(h|v))`` over ``v`` (``kl_divergence`` of ``posterior.distribution`` and
    ``model.exact_posterior``); a relaxed-Bernoulli q is compared through its logits."""
    q = posterior.distribution(posterior(v))
    return kl_divergence(q, model.exact_posterior(v)).mean()


@dataclass(frozen=True)
class GradientBias:
    """``‖E[g] − ∇J‖₂`` for an estimator's energy gradient g, the same relative to ``‖∇J‖₂``, the standard error of
    the first, and ``‖∇J‖₂`` itself."""

    bias: float
    relative_bias: float
    stderr: float
    repeats: int
    exact_norm: float


def _energy_gradient(model: EnergyModel, loss: torch.Tensor) -> torch.Tensor:
    """The energy's gradient as one vector; a parameter the loss does not reach has gradient zero."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads, strict=True)])


def _adapted_posterior(objective, model, posterior, optimizer, v, n_lower_steps, n_unroll, seed):
    """q after ``n_lower_steps`` real steps and an ``n_unroll``-step unroll, from copies of q and its optimizer."""
    if optimizer is None:  # a posterior without weights (the exact one) is used as it is
        return BoundPosterior(posterior)
    q_module = copy.deepcopy(posterior)
    accepted = inspect.signature(type(optimizer)).parameters
    settings = {key: value for key, value in optimizer.defaults.items() if key in accepted}
    q_optimizer = type(optimizer)(q_module.parameters(), **settings)
    # load_state_dict keeps the very tensors it is given: copy them, or these steps would move the real moments
    q_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    generator = torch.Generator(device=v.device).manual_seed(seed)
    fit_posterior(objective.lower_loss, model, q_module, q_optimizer, v, generator, n_lower_steps)
    return unroll(q_module, q_optimizer, lambda q_: objective.lower_loss(model, q_, v, generator), n_unroll)


def gradient_bias(
    model: EnergyModel,
    posterior: Posterior,
    optimizer: torch.optim.Optimizer | None,
    objective: ScoreMatching,
    v: torch.Tensor,
    repeats: int = 100,
    n_lower_steps: int | None = None,
    n_unroll: int | None = None,
    seed: int = 0,
) -> GradientBias:
    """Bias of the objective's energy gradient (BiSM's, VaGES's) against the same score-matching objective with the
    exact score.

    For each of ``repeats`` draws r, q restarts from its current weights and ``optimizer``'s current state,
    takes ``n_lower_steps`` real steps and an ``n_unroll``-step unroll (the objective's own counts by default),
    and ``g_r`` is the energy gradient of the BiSM higher loss; ``g*_r`` is the gradient of the exact-score loss
    with the same noise ``ε`` (both higher losses draw from a generator seeded ``seed + r`` first). With
    ``d_r = g_r − g*_r`` on minibatch ``v``, the bias is ``sqrt(max(0, ‖mean d‖² − tr Cov(d)/R))``: the squared
    norm of a mean of R noisy vectors overestimates ``‖E d‖²`` by ``tr Cov(d)/R``, which this removes. The
    standard error is that of ``‖mean d‖`` by the delta method. The real posterior and optimizer are not modified;
    ``optimizer=None`` is for a posterior without weights (the exact one).
    """
    n_lower_steps = objective.n_lower_steps if n_lower_steps is None else n_lower_steps
    n_unroll = objective.n_unroll if n_unroll is None else n_unroll
    exact = objective.with_exact_score()
    differences, exact_gradients = [], []
    for r in range(repeats):
        q = _adapted_posterior(objective, model, posterior, optimizer, v, n_lower_steps, n_unroll, seed + repeats + r)
        bism = _energy_gradient(
            model, objective.higher_loss(model, q, v, torch.Generator(device=v.device).manual_seed(seed + r))
        )
        reference = _energy_gradient(
            model, exact.higher_loss(model, None, v, torch.Generator(device=v.device).manual_seed(seed + r))
        )
        differences.append(bism - reference)
        exact_gradients.append(reference)
    differences = torch.stack(differences)
    mean_difference = differences.mean(0)
    # ‖mean d‖² overestimates ‖E d‖² by tr(Cov d)/R: remove that so noise alone does not read as bias.
    noise = differences.var(0).sum() / repeats if repeats > 1 else torch.zeros(())
    bias = torch.sqrt((mean_difference.square().sum() - noise).clamp_min(0))
    direction = mean_difference / mean_difference.norm().clamp_min(torch.finfo(bias.dtype).tiny)
    # standard error of ‖mean d‖ (delta method: the spread of the d_r along the mean's direction)
    stderr = (differences @ direction).std() / math.sqrt(repeats) if repeats > 1 else torch.tensor(float("nan"))
    exact_norm = torch.stack(exact_gradients).mean(0).norm()
    return GradientBias(float(bias), float(bias / exact_norm), float(stderr), repeats, float(exact_norm))
