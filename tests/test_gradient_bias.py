"""Gradient bias of BiSM and the posterior gap: zero with the exact posterior, shrinking with more lower steps."""

from __future__ import annotations

import copy
import math

import torch

from eblvm.evaluation.posterior import bernoulli_kl, gradient_bias, posterior_gap
from eblvm.objectives import ScoreMatching
from eblvm.posteriors import ExactGRBMPosterior, RelaxedBernoulliPosterior
from tests.test_grbm import random_grbm


def test_bernoulli_kl_matches_enumeration(float64):
    q_logits, p_logits = torch.randn(3), torch.randn(3)
    states = torch.cartesian_prod(*[torch.tensor([0.0, 1.0])] * 3)

    def log_mass(logits):
        return (
            states * torch.nn.functional.logsigmoid(logits) + (1 - states) * torch.nn.functional.logsigmoid(-logits)
        ).sum(-1)

    enumerated = (log_mass(q_logits).exp() * (log_mass(q_logits) - log_mass(p_logits))).sum()
    torch.testing.assert_close(bernoulli_kl(q_logits, p_logits), enumerated)


def test_gradient_bias_is_zero_with_the_exact_posterior(float64):
    model = random_grbm(2, 4, seed=40)
    posterior = ExactGRBMPosterior(model)
    objective = ScoreMatching(higher="dsm", estimator="bism", sigma=0.1)
    result = gradient_bias(model, posterior, None, objective, torch.rand(50, 2), repeats=20)
    assert result.bias < 1e-10 and result.relative_bias < 1e-10
    assert float(posterior_gap(model, posterior, torch.rand(50, 2))) < 1e-12


def test_gradient_bias_falls_as_lower_steps_grow():
    """A fixed GRBM and a random q: more real posterior steps bring BiSM's gradient closer to DSM's."""
    torch.manual_seed(0)
    model = random_grbm(2, 4, seed=41, scale=2.0)
    posterior = RelaxedBernoulliPosterior(2, 4)
    optimizer = torch.optim.Adam(posterior.parameters(), lr=0.05, betas=(0.9, 0.95))
    objective = ScoreMatching(higher="dsm", estimator="bism", sigma=0.1, n_unroll=0)
    v = torch.rand(100, 2)
    results = {
        k: gradient_bias(model, posterior, optimizer, objective, v, repeats=100, n_lower_steps=k) for k in (0, 100)
    }
    combined_stderr = math.hypot(results[0].stderr, results[100].stderr)
    assert results[0].bias - results[100].bias > 3 * combined_stderr, results
    gap_before = float(posterior_gap(model, posterior, v))
    assert gap_before > 0.1


def test_gradient_bias_leaves_the_real_posterior_and_optimizer_untouched():
    torch.manual_seed(1)
    model = random_grbm(2, 4, seed=42)
    posterior = RelaxedBernoulliPosterior(2, 4)
    optimizer = torch.optim.Adam(posterior.parameters(), lr=0.05)
    objective = ScoreMatching(higher="dsm", estimator="bism", sigma=0.1, n_lower_steps=3, n_unroll=2)
    v = torch.rand(20, 2)
    posterior(v).sum().backward()
    optimizer.step()  # non-empty Adam state
    weights = copy.deepcopy(posterior.state_dict())
    state = copy.deepcopy(optimizer.state_dict())
    gradient_bias(model, posterior, optimizer, objective, v, repeats=3)
    assert all(torch.equal(weights[k], posterior.state_dict()[k]) for k in weights)
    for index, moments in state["state"].items():
        assert all(torch.equal(value, optimizer.state_dict()["state"][index][name]) for name, value in moments.items())
