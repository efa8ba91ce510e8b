"""Lower-level losses decrease with the energy fixed and move q toward the exact posterior."""

from __future__ import annotations

import pytest
import torch

from eblvm.objectives import ScoreMatching
from eblvm.posteriors import BoundPosterior, GaussianMLPPosterior, RelaxedBernoulliPosterior
from tests.models import GaussianLinear
from tests.test_grbm import random_grbm


def _fit(objective, model, posterior, v, steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.Adam(posterior.parameters(), lr=lr)
    generator, losses = torch.Generator().manual_seed(0), []
    for _ in range(steps):
        loss = objective.lower_loss(model, BoundPosterior(posterior), v, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.parametrize("lower", ["elbo", "iwae"])
@pytest.mark.parametrize("higher", ["dsm", "mdsm", "ssm"])
def test_bernoulli_lower_losses_decrease(lower, higher):
    torch.manual_seed(0)
    model = random_grbm(2, 4, seed=20, scale=2.0).requires_grad_(False)
    posterior = RelaxedBernoulliPosterior(2, 4, temperature=0.1)
    objective = ScoreMatching(higher=higher, estimator="bism", lower=lower, sigma=0.05, iwae_k=5)
    losses = _fit(objective, model, posterior, torch.rand(300, 2), steps=400, lr=0.02)
    assert _mean(losses[-40:]) < _mean(losses[:40]) - 0.05


def test_posterior_fisher_loss_decreases_and_finds_the_posterior_mean():
    """A Gaussian-linear EBLVM: the Fisher lower loss pulls q's mean onto the exact ΣAᵀv."""
    torch.manual_seed(0)
    model = GaussianLinear(3, 2).requires_grad_(False)
    posterior = GaussianMLPPosterior(3, 2, hidden_dim=32)
    objective = ScoreMatching(higher="mdsm", estimator="bism", lower="fisher")
    v = torch.randn(256, 3)
    exact_mean, _ = model.posterior_mean_and_cov(v)

    def mean_error() -> float:
        with torch.no_grad():
            return float((posterior(v)[0] - exact_mean).abs().mean())

    initial_error = mean_error()
    losses = _fit(objective, model, posterior, v, steps=600, lr=5e-3)
    assert _mean(losses[-50:]) < 0.5 * _mean(losses[:50])
    assert mean_error() < 0.3 * initial_error


def test_fisher_lower_loss_refuses_binary_latents():
    objective = ScoreMatching(estimator="bism", lower="fisher")
    with pytest.raises(ValueError, match="objective.lower='fisher'.*continuous latents"):
        objective.check_model(random_grbm(2, 3), latent_type="binary")
