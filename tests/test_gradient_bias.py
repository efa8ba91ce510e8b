"""Gradient bias of BiSM and the posterior gap: zero with the exact posterior, shrinking with more lower steps."""

from __future__ import annotations

import copy
import math

import torch

from eblvm.evaluation.posterior import gradient_bias, posterior_gap
from eblvm.objectives import ScoreMatching
from eblvm.posteriors import RelaxedBernoulliPosterior
from tests.test_grbm import random_grbm


def test_posterior_gap_is_the_bernoulli_kl_in_closed_form_and_by_enumeration(float64):
    """``posterior_gap`` is the mean over rows of ``kl_divergence(q.distribution, model.exact_posterior)``, which
    equals the closed form ``Σ σ(l_q)(log σ(l_q) − log σ(l_p)) + σ(−l_q)(log σ(−l_q) − log σ(−l_p))`` and the
    sum over all hidden states of ``q(h)(log q(h) − log p(h))``."""
    model = random_grbm(2, 3, seed=43)
    posterior = RelaxedBernoulliPosterior(2, 3)
    v = torch.randn(5, 2)
    with torch.no_grad():
        q_logits, p_logits = posterior(v), model.hidden_logits(v)
        kl = torch.distributions.kl_divergence(posterior.distribution(posterior(v)), model.exact_posterior(v))
    logsigmoid = torch.nn.functional.logsigmoid
    closed_form = (
        torch.sigmoid(q_logits) * (logsigmoid(q_logits) - logsigmoid(p_logits))
        + torch.sigmoid(-q_logits) * (logsigmoid(-q_logits) - logsigmoid(-p_logits))
    ).sum(-1)
    assert kl.shape == (5,)
    torch.testing.assert_close(kl, closed_form)

    states = torch.cartesian_prod(*[torch.tensor([0.0, 1.0])] * 3)[:, None, :]  # (8, 1, 3) against rows (5, 3)

    def log_mass(logits):
        return (states * logsigmoid(logits) + (1 - states) * logsigmoid(-logits)).sum(-1)

    enumerated = (log_mass(q_logits).exp() * (log_mass(q_logits) - log_mass(p_logits))).sum(0)
    torch.testing.assert_close(closed_form, enumerated)
    torch.testing.assert_close(posterior_gap(model, posterior, v), closed_form.mean())


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
