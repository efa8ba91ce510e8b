"""GRBM algebra against enumeration, numerical integration and AIS (float64)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from eblvm.evaluation.likelihood import log_likelihood, log_partition
from eblvm.models import GRBM, EnergyModel
from eblvm.objectives.score_losses import score_matching
from eblvm.sampling import gibbs_sample


def random_grbm(v_dim: int, h_dim: int, seed: int = 0, scale: float = 1.0) -> GRBM:
    torch.manual_seed(seed)
    model = GRBM(v_dim, h_dim)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
        model.log_sigma.uniform_(-0.3, 0.3)
    return model


def all_hidden_states(h_dim: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=h_dim)))


def test_free_energy_is_log_sum_over_hidden_states(float64):
    model = random_grbm(3, 5)
    v = torch.randn(7, 3)
    h = all_hidden_states(5)[:, None, :]  # (32, 1, 5) broadcasts against v (7, 3)
    enumerated = -torch.logsumexp(-model(v, h), dim=0)
    torch.testing.assert_close(model.free_energy(v), enumerated, rtol=1e-12, atol=1e-12)


def test_exact_log_partition_matches_numerical_integration(float64):
    model = random_grbm(2, 3, seed=1)
    b, sigma = model.b.detach().numpy(), np.exp(model.log_sigma.detach().numpy())

    def density(y: float, x: float) -> float:
        return float(torch.exp(-model.free_energy(torch.tensor([[x, y]])))[0])

    span = 12 * sigma.max() + 4 * float(model.W.detach().abs().sum())
    z, error = integrate.dblquad(density, b[0] - span, b[0] + span, b[1] - span, b[1] + span, epsabs=1e-12)
    assert error < 1e-8 * z
    assert float(model.log_partition()) == pytest.approx(math.log(z), abs=1e-7)


def test_ais_agrees_with_exact_log_partition_within_its_error(float64):
    model = random_grbm(5, 10, seed=2, scale=1.5)
    exact = float(model.log_partition())
    value, stderr = model.ais_log_partition(
        n_temperatures=1000, n_chains=500, generator=torch.Generator().manual_seed(0)
    )
    assert stderr > 0
    assert abs(value - exact) < 4 * stderr + 1e-3
    assert log_partition(model, exact_max_h_dim=20).method == "exact"
    assert log_partition(model, exact_max_h_dim=5, ais_temperatures=100, ais_chains=50).method == "ais"


def test_closed_form_score_equals_autograd_of_free_energy(float64):
    model = random_grbm(4, 6, seed=3)
    v = torch.randn(9, 4)
    torch.testing.assert_close(model.score(v), EnergyModel.score(model, v), rtol=1e-12, atol=1e-12)


def test_sm_objective_uses_exact_hessian_trace(float64):
    """docs/methods.md §8: tr ∇s = −Σ 1/σ_i² + Σ_j σ(a_j)(1−σ(a_j)) Σ_i W_ij², a = c + Wᵀv."""
    model = random_grbm(3, 4, seed=4)
    v = torch.randn(11, 3)
    probs = torch.sigmoid(model.hidden_logits(v))
    trace = -(1 / model.variance).sum() + (probs * (1 - probs)) @ (model.W**2).sum(0)
    expected = (0.5 * (model.score(v) ** 2).sum(-1) + trace).mean()
    torch.testing.assert_close(score_matching(model.score, v), expected, rtol=1e-12, atol=1e-12)


def test_log_likelihood_of_normalised_density(float64):
    model = random_grbm(2, 3, seed=5)
    v = torch.randn(4, 2)
    log_z = log_partition(model)
    expected = (-model.free_energy(v) - model.log_partition()).mean()
    torch.testing.assert_close(log_likelihood(model, v, log_z), expected.detach())


def test_gibbs_samples_match_exact_moments(float64):
    """Gibbs samples of a 1-D GRBM have the mean and variance of the exact marginal (by enumeration)."""
    model = random_grbm(1, 2, seed=6)
    h = all_hidden_states(2)
    u = h @ model.W.T
    log_weights = h @ model.c + u @ model.b + 0.5 * (model.variance * u**2).sum(-1)
    weights = torch.softmax(log_weights, 0).detach()
    means = model.visible_mean(h).detach()[:, 0]
    exact_mean = (weights * means).sum()
    exact_var = (weights * (means**2)).sum() - exact_mean**2 + model.variance.detach()[0]
    samples = gibbs_sample(model, 20000, n_sweeps=50, generator=torch.Generator().manual_seed(0), return_mean=False)
    stderr = math.sqrt(float(exact_var) / 20000)
    assert abs(float(samples.mean()) - float(exact_mean)) < 5 * stderr
    assert float(samples.var()) == pytest.approx(float(exact_var), rel=0.05)
