"""The linear-Gaussian EBLVM (docs/methods.md §2.4) and its exact posterior against closed forms and quadrature
(float64), and its wiring through the builder and a short training run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.func import functional_call

from eblvm.assemble import assemble, rebuild
from eblvm.errors import ConfigError
from eblvm.evaluation.likelihood import log_likelihood, log_partition
from eblvm.evaluation.posterior import gradient_bias, posterior_gap
from eblvm.models import GRBM, EnergyModel, GaussianLinear
from eblvm.objectives import ScoreMatching
from eblvm.objectives.estimators import BiSMScore
from eblvm.objectives.lower import ELBO, IWAE, PosteriorFisher
from eblvm.posteriors import BoundPosterior, ExactGaussianLinearPosterior, GaussianMLPPosterior
from eblvm.run import run
from tests import models as test_models
from tests.conftest import FAST_RUN, compose_train_config


def random_model(v_dim: int, h_dim: int, seed: int = 0, scale: float = 1.0) -> GaussianLinear:
    torch.manual_seed(seed)
    model = GaussianLinear(v_dim, h_dim)
    with torch.no_grad():
        model.A.mul_(scale)
        model.b.mul_(scale)
        model.log_sigma.uniform_(-0.5, 0.3)
    return model


def marginal(model: GaussianLinear) -> torch.distributions.MultivariateNormal:
    """``N(b, σ²I + AAᵀ)`` built directly from the parameters."""
    covariance = model.variance * torch.eye(model.v_dim) + model.A @ model.A.T
    return torch.distributions.MultivariateNormal(model.b, covariance)


def trapezoid_grid(centre: torch.Tensor, half_width: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points and trapezoid weights on ``[centre − half_width, centre + half_width]``."""
    points = torch.linspace(-half_width, half_width, n) + centre
    weights = torch.full((n,), 2 * half_width / (n - 1))
    weights[[0, -1]] /= 2
    return points, weights


def test_capabilities_and_initialisation():
    model = GaussianLinear(3, 2, sigma_init=0.5)
    assert model.has_free_energy and model.has_exact_log_partition and model.has_exact_posterior
    assert not model.has_ais and not model.has_gibbs_sampler and model.latent_type == "continuous"
    assert model.A.shape == (3, 2) and model.b.shape == (3,) and model.log_sigma.shape == ()
    assert float(model.A.detach().abs().max()) <= 2**-0.5 and float(model.b.detach().abs().max()) <= 2**-0.5
    torch.testing.assert_close(model.log_sigma, torch.tensor(math.log(0.5)))
    assert {name for name, _ in model.named_parameters()} == {"A", "b", "log_sigma"}
    fixed = GaussianLinear(3, 2, learn_sigma=False)
    assert {name for name, _ in fixed.named_parameters()} == {"A", "b"} and "log_sigma" in fixed.state_dict()
    with pytest.raises(ConfigError, match="sigma_init"):
        GaussianLinear(3, 2, sigma_init=0.0)


def test_energy_broadcasts_over_particles(float64):
    model = random_model(3, 2)
    v, h = torch.randn(4, 3), torch.randn(5, 4, 2)
    energy = model(v, h)
    assert energy.shape == (5, 4)
    direct = 0.5 * ((v - h[1] @ model.A.T - model.b) ** 2).sum(-1) / model.variance + 0.5 * (h[1] ** 2).sum(-1)
    torch.testing.assert_close(energy[1], direct, rtol=0, atol=1e-12)


def test_free_energy_and_log_partition_give_the_factor_analysis_marginal(float64):
    model = random_model(4, 3, seed=1, scale=2.0)
    v = 3 * torch.randn(20, 4)
    log_density = -model.free_energy(v) - model.log_partition()
    torch.testing.assert_close(log_density, marginal(model).log_prob(v), rtol=0, atol=1e-10)
    sigma = torch.exp(model.log_sigma)
    expected_log_z = 0.5 * 4 * torch.log(2 * math.pi * sigma**2) + 0.5 * 3 * math.log(2 * math.pi)
    torch.testing.assert_close(model.log_partition(), expected_log_z, rtol=0, atol=1e-12)
    mean_ll = log_likelihood(model, v, log_partition(model))
    torch.testing.assert_close(mean_ll, marginal(model).log_prob(v).mean(), rtol=0, atol=1e-10)
    assert log_partition(model).method == "exact"


@pytest.mark.parametrize("h_dim", [1, 2])
def test_free_energy_is_minus_log_integral_over_h(float64, h_dim):
    """``F(v) = −log ∫ exp(−E(v,h)) dh`` by the trapezoid rule on a grid around the posterior mean (the
    posterior standard deviations are below 1, so ±12 holds all the mass)."""
    model = random_model(3, h_dim, seed=2, scale=1.5)
    v = torch.randn(5, 3)
    means = model.exact_posterior(v).mean
    for row in range(v.shape[0]):
        axes = [trapezoid_grid(means[row, j], 12.0, 801) for j in range(h_dim)]
        points = torch.cartesian_prod(*[p for p, _ in axes]).reshape(-1, h_dim)
        weights = torch.cartesian_prod(*[w for _, w in axes]).reshape(-1, h_dim).prod(-1)
        integral = torch.logsumexp(-model(v[row], points) + torch.log(weights), 0)
        torch.testing.assert_close(model.free_energy(v[row]), -integral, rtol=0, atol=1e-9)


def test_log_partition_is_the_normalisation_of_the_joint(float64):
    """``log ∫∫ exp(−E(v,h)) dv dh`` on a 1+1-dimensional grid (h's marginal is N(0, 1), v's is N(b, C))."""
    model = random_model(1, 1, seed=3, scale=1.5)
    c = float((model.variance + model.A.square().sum()).detach())
    v_points, v_weights = trapezoid_grid(model.b.detach()[0], 14 * math.sqrt(c), 1601)
    h_points, h_weights = trapezoid_grid(torch.tensor(0.0), 14.0, 1601)
    v, h = torch.meshgrid(v_points, h_points, indexing="ij")
    log_weights = torch.log(v_weights[:, None] * h_weights[None, :])
    with torch.no_grad():
        integral = torch.logsumexp((-model(v[..., None], h[..., None]) + log_weights).flatten(), 0)
        torch.testing.assert_close(model.log_partition(), integral, rtol=0, atol=1e-9)


def test_closed_form_score_equals_autograd_of_minus_free_energy(float64):
    model = random_model(4, 3, seed=4, scale=2.0)
    v = 2 * torch.randn(10, 4)
    torch.testing.assert_close(model.score(v), EnergyModel.score(model, v), rtol=0, atol=1e-10)
    covariance = model.variance * torch.eye(4) + model.A @ model.A.T
    torch.testing.assert_close(model.score(v), -torch.linalg.solve(covariance, (v - model.b).T).T, rtol=0, atol=1e-10)
    # differentiable in the parameters and in v
    v.requires_grad_(True)
    model.score(v).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_exact_posterior_is_the_normalised_joint(float64):
    """``−E(v,h) − log p(h|v) = −F(v)`` for every h, far ones included."""
    model = random_model(3, 2, seed=5, scale=2.0)
    v, h = torch.randn(6, 3), 4 * torch.randn(50, 6, 2)
    posterior = model.exact_posterior(v)
    assert posterior.batch_shape == (6,) and posterior.event_shape == (2,)
    residual = -model(v, h) - posterior.log_prob(h)
    torch.testing.assert_close(residual, (-model.free_energy(v)).expand(50, 6), rtol=0, atol=1e-10)
    mean, covariance = model.posterior_mean_and_covariance(v)
    precision = torch.eye(2) + model.A.T @ model.A / model.variance
    torch.testing.assert_close(covariance, torch.linalg.inv(precision), rtol=0, atol=1e-12)
    torch.testing.assert_close(mean, (v - model.b) @ model.A / model.variance @ covariance, rtol=0, atol=1e-12)


def test_exact_posterior_module_samples_and_scores_the_posterior(float64):
    model = random_model(3, 2, seed=6, scale=2.0)
    q = ExactGaussianLinearPosterior(model)
    assert q.h_dim == 2 and q.latent_type == "continuous" and not list(q.parameters())
    v = torch.randn(4, 3)
    dist = q(v)
    sample = q.rsample(dist, 7, torch.Generator().manual_seed(0))
    assert sample.shape == (7, 4, 2)
    torch.testing.assert_close(sample, q.rsample(dist, 7, torch.Generator().manual_seed(0)), rtol=0, atol=0)
    exact = model.exact_posterior(v)
    torch.testing.assert_close(q.log_prob(sample, dist), exact.log_prob(sample), rtol=0, atol=1e-10)
    torch.testing.assert_close(q.log_prob(sample, dist, h=sample), exact.log_prob(sample), rtol=0, atol=1e-10)
    torch.testing.assert_close(q.mean(dist), exact.mean, rtol=0, atol=1e-12)
    distribution = q.distribution(dist)
    assert distribution.batch_shape == (4,) and distribution.event_shape == (2,)
    torch.testing.assert_close(distribution.covariance_matrix, exact.covariance_matrix, rtol=0, atol=1e-12)
    # the draws have the posterior's moments
    many = q.rsample(dist, 200_000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(many.mean(0), exact.mean, rtol=0, atol=0.02)
    centred = many[:, 0] - exact.mean[0]
    torch.testing.assert_close(centred.T @ centred / len(centred), exact.covariance_matrix[0], rtol=0, atol=0.02)
    # draws are reparameterised: they carry the model's gradient
    q.rsample(q(v), 3, torch.Generator().manual_seed(2)).sum().backward()
    assert model.A.grad is not None and model.b.grad is not None


def test_exact_posterior_module_works_bound_and_under_functional_call(float64):
    model = random_model(3, 2, seed=7)
    q = ExactGaussianLinearPosterior(model)
    v = torch.randn(5, 3)
    for bound in (BoundPosterior(q), BoundPosterior(q, {}), BoundPosterior.detached(q)):
        mean, scale_tril = bound(v)
        torch.testing.assert_close(mean, model.exact_posterior(v).mean, rtol=0, atol=1e-12)
        assert scale_tril.shape == (1, 2, 2)  # one factor for all rows, broadcast over them
        torch.testing.assert_close((scale_tril @ scale_tril.mT)[0], model.exact_posterior(v).covariance_matrix[0])
    mean, _ = functional_call(q, {}, (v,))
    torch.testing.assert_close(mean, q(v)[0], rtol=0, atol=0)
    # parameters broadcast over a leading particle axis of v
    mean, scale_tril = q(v.expand(3, 5, 3))
    assert mean.shape == (3, 5, 2)
    h = torch.randn(3, 5, 2)
    torch.testing.assert_close(
        q.log_prob(h, (mean, scale_tril)), model.exact_posterior(v).log_prob(h), atol=1e-10, rtol=0
    )


def test_exact_posterior_module_refuses_models_without_an_exact_gaussian_posterior():
    with pytest.raises(ConfigError, match="no exact Gaussian posterior"):
        ExactGaussianLinearPosterior(GRBM(2, 3))
    with pytest.raises(ConfigError, match="no exact Gaussian posterior"):
        ExactGaussianLinearPosterior(test_models.GaussianLinear(2, 3))  # has the method's cousin, not the flag
    with pytest.raises(ConfigError, match="must equal model.h_dim=3"):
        ExactGaussianLinearPosterior(GaussianLinear(2, 3), h_dim=2)
    assert ExactGaussianLinearPosterior(GaussianLinear(2, 3), h_dim=3).h_dim == 3


def test_bism_score_with_the_exact_posterior_is_exact_for_every_particle(float64):
    model = random_model(3, 2, seed=8, scale=2.0)
    q = BoundPosterior(ExactGaussianLinearPosterior(model))
    v = torch.randn(6, 3, requires_grad=True)
    scores = BiSMScore(n_particles=5).score_function(model, q, torch.Generator().manual_seed(0))(v)
    assert scores.shape == (5, 6, 3)
    torch.testing.assert_close(scores, model.score(v).expand(5, 6, 3), rtol=0, atol=1e-10)


def test_lower_losses_with_the_exact_posterior_are_exact_for_every_draw(float64):
    """ELBO and IWAE equal ``F(v)`` for every draw (``log p̃(v,h) − log p(h|v) = −F(v)``); the posterior Fisher
    divergence is 0."""
    model = random_model(3, 2, seed=9, scale=2.0)
    q = BoundPosterior(ExactGaussianLinearPosterior(model))
    v = torch.randn(8, 3)
    free_energy = model.free_energy(v)
    for seed in range(5):
        elbo = ELBO()(model, q, v, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(elbo, free_energy, rtol=0, atol=1e-10)
        for k in (1, 3, 10):
            iwae = IWAE(iwae_k=k)(model, q, v, torch.Generator().manual_seed(seed))
            torch.testing.assert_close(iwae, free_energy, rtol=0, atol=1e-10)
        fisher = PosteriorFisher()(model, q, v, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(fisher, torch.zeros(8), rtol=0, atol=1e-20)


def test_posterior_gap_is_zero_for_the_exact_posterior_and_the_gaussian_kl_for_a_diagonal_q(float64):
    model = random_model(3, 2, seed=10, scale=2.0)
    v = torch.randn(30, 3)
    assert abs(float(posterior_gap(model, ExactGaussianLinearPosterior(model), v))) < 1e-10

    torch.manual_seed(11)
    q = GaussianMLPPosterior(3, 2, hidden_dim=8)
    mean_q, log_std = q(v)
    var_q = torch.exp(2 * log_std)
    precision = torch.eye(2) + model.A.T @ model.A / model.variance
    mean_p, _ = model.posterior_mean_and_covariance(v)
    delta = mean_q - mean_p
    # KL(N(μq, diag σq²) ‖ N(μp, P⁻¹)) = ½[tr(P diag σq²) + δᵀPδ − m − log|P| − Σ log σq²]
    by_hand = 0.5 * (
        (torch.diagonal(precision) * var_q).sum(-1)
        + ((delta @ precision) * delta).sum(-1)
        - 2
        - torch.logdet(precision)
        - torch.log(var_q).sum(-1)
    )
    gap = posterior_gap(model, q, v)
    torch.testing.assert_close(gap, by_hand.mean().detach(), rtol=0, atol=1e-10)
    assert float(gap) > 0


def test_gradient_bias_is_zero_with_the_exact_posterior(float64):
    model = random_model(2, 2, seed=12)
    posterior = ExactGaussianLinearPosterior(model)
    objective = ScoreMatching(higher="dsm", estimator="bism", sigma=0.1, lower="fisher")
    result = gradient_bias(model, posterior, None, objective, torch.randn(40, 2), repeats=10)
    assert result.bias < 1e-10 and result.relative_bias < 1e-10


# The builder and a short run -------------------------------------------------------------------------------------

MLP_RUN = ["model=gaussian_linear", "posterior=gaussian_mlp", "objective=bism", "objective.lower=fisher", "data=moons"]
EXACT_RUN = ["model=gaussian_linear", "posterior=gaussian_linear_exact", "objective=bism", "data=moons"]
# Keeps the two training runs to seconds: a small q, short lower level and unroll, few gradient-bias draws.
SMALL = [
    "posterior.hidden_dim=16",
    "objective.n_lower_steps=2",
    "objective.n_unroll=1",
    "evaluation.gradient_bias_repeats=5",
]
EVALUATIONS = {"LogLikelihood", "SMObjective", "PosteriorGap", "GradientBias", "Timing", "Figures"}


@pytest.mark.parametrize("overrides", [MLP_RUN, EXACT_RUN], ids=["gaussian_mlp", "exact"])
def test_builder_switches_on_the_exact_evaluations(tmp_path, overrides):
    cfg = compose_train_config(tmp_path, FAST_RUN + overrides)
    parts = assemble(cfg)
    assert isinstance(parts.model, GaussianLinear) and parts.model.v_dim == 2 and parts.model.h_dim == 2
    expected = GaussianMLPPosterior if "posterior=gaussian_mlp" in overrides else ExactGaussianLinearPosterior
    assert isinstance(parts.posterior, expected)
    assert {type(callback).__name__ for callback in parts.evaluation_callbacks} == EVALUATIONS


def test_exact_posterior_config_refuses_a_grbm(tmp_path):
    cfg = compose_train_config(tmp_path, FAST_RUN + ["posterior=gaussian_linear_exact"])
    with pytest.raises(ConfigError, match="posterior.model"):
        assemble(cfg)


def test_bidsm_with_a_diagonal_q_trains_end_to_end(tmp_path):
    summary = run(compose_train_config(tmp_path, FAST_RUN + MLP_RUN + SMALL))
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["steps"] == summary["steps"] == 30 and saved["log_z"] == "exact"
    assert set(saved["evaluations"]) == EVALUATIONS
    tested = saved["best_checkpoint"] if saved["tested"] == "best checkpoint" else saved["last_checkpoint"]
    trained = rebuild(tested)
    model, test = trained.model.double(), trained.datamodule.splits.test.double()
    covariance = torch.exp(2 * model.log_sigma) * torch.eye(model.v_dim) + model.A @ model.A.T  # C = σ²I + AAᵀ
    marginal = torch.distributions.MultivariateNormal(model.b, covariance)
    assert saved["test/log_likelihood"] == pytest.approx(float(marginal.log_prob(test).mean()), rel=1e-4)
    assert math.isfinite(saved["test/sm_objective"])
    assert saved["test/posterior_gap"] > 0  # a diagonal q cannot match the full posterior covariance
    assert saved["val/gradient_bias_stderr"] > 0  # a learned q's gradient varies from draw to draw
    assert (tmp_path / "density.png").is_file()


def test_bidsm_with_the_exact_posterior_has_no_gap_and_no_gradient_bias(tmp_path):
    run(compose_train_config(tmp_path, FAST_RUN + EXACT_RUN + SMALL[3:]))
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert math.isfinite(saved["test/log_likelihood"])
    assert abs(saved["test/posterior_gap"]) < 1e-5
    assert saved["val/gradient_bias"] <= saved["val/gradient_bias_stderr"] + 1e-6, saved
