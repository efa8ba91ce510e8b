"""VaES, VaGES, KSD and IS-KSD against exact quantities (docs/methods.md §4).

The exact references: the GRBM's posterior by enumerating its hidden states, and the linear-Gaussian model's
Gaussian posterior through a symmetric sigma-point set (2m points ``μ ± √m·L e_j``, weight 1/(2m) each), which
reproduces a Gaussian's moments up to the third. Every quantity VaGES takes an expectation of is a polynomial of
degree at most 2 in h for that model, and a covariance between a linear and a quadratic one, so the sigma-point
averages are exact.
"""

from __future__ import annotations

import math

import pytest
import torch

from eblvm.errors import ConfigError
from eblvm.members import batch_mean
from eblvm.models.deep import LatentEBM
from eblvm.objectives import ScoreMatching
from eblvm.objectives.estimators import (
    ImportanceSampledScore,
    VaESScore,
    VaGESScore,
    covariance_term,
    expectation_term,
    mean_particle_score,
)
from eblvm.objectives.score_losses import DenoisingSM, KernelStein, MultiscaleDSM, Perturbation
from eblvm.posteriors import BoundPosterior, ExactGaussianLinearPosterior, ExactGRBMPosterior
from tests.test_gaussian_linear import random_model
from tests.test_grbm import all_hidden_states, random_grbm

LOSSES = {
    "dsm": lambda: DenoisingSM(sigma=0.3),
    "mdsm": lambda: MultiscaleDSM(sigma_begin=0.1, sigma_end=1.0, sigma0=0.2),
    "ksd": lambda: KernelStein(bandwidth=1.5),
}


def _grbm_posterior_particles(model, v):
    """Every hidden state, ``(2^m, B, m)``, with its exact posterior probability per row, ``(2^m, B)``."""
    states = all_hidden_states(model.h_dim).to(v.dtype)
    h = states[:, None, :].expand(-1, v.shape[0], -1)
    return h, model.exact_posterior(v).log_prob(h).exp().detach()


def _linear_sigma_points(model, v):
    """The sigma points of the exact Gaussian posterior, ``(2m, B, m)``, with weights 1/(2m)."""
    mean, covariance = model.posterior_mean_and_covariance(v)
    m = model.h_dim
    columns = math.sqrt(m) * torch.linalg.cholesky(covariance).T  # row j: √m·L e_j
    offsets = torch.cat([columns, -columns])[:, None, :]
    return (mean + offsets).detach(), torch.full((2 * m, v.shape[0]), 1 / (2 * m), dtype=v.dtype)


EXACT = {
    "grbm": (lambda: random_grbm(3, 4, seed=3), _grbm_posterior_particles),
    "gaussian_linear": (lambda: random_model(3, 2, seed=4), _linear_sigma_points),
}


def _gradient(loss, model):
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True, materialize_grads=True)
    return torch.cat([g.flatten() for g in grads])


def _perturbation(loss, v, seed=0):
    return loss.perturb(v, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_name", list(EXACT))
def test_vaes_with_the_exact_posterior_averages_to_the_exact_score(float64, model_name):
    make_model, exact_particles = EXACT[model_name]
    model = make_model()
    v = torch.randn(6, 3)
    h, weights = exact_particles(model, v)
    expected = mean_particle_score(model, v, h, weights, create_graph=False)
    torch.testing.assert_close(expected, model.score(v.requires_grad_()).detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("model_name", list(EXACT))
def test_vages_with_exact_moments_is_the_exact_objectives_gradient(float64, model_name, loss_name):
    """zᵀ(E_post[∂θ∇v log p̃] + Cov_post(∇v log p̃, ∇θ log p̃)) = ∂θ of the loss with the exact score −∇F."""
    make_model, exact_particles = EXACT[model_name]
    model, loss = make_model(), LOSSES[loss_name]()
    v = 0.5 * torch.randn(8, 3)
    perturbation = _perturbation(loss, v)
    x = perturbation.inputs
    exact = _gradient(loss.at(model.score, perturbation), model)
    h, weights = exact_particles(model, x)
    z = loss.residual(model.score(x.detach().requires_grad_()), perturbation)
    rows = expectation_term(model, x, z, h, weights) + covariance_term(model, x, z, h, weights, factor=1.0)
    torch.testing.assert_close(_gradient(batch_mean(rows, x), model), exact, rtol=1e-9, atol=1e-10)
    # without the covariance term the gradient is not the exact one: the term matters
    assert not torch.allclose(_gradient(batch_mean(expectation_term(model, x, z, h, weights), x), model), exact)


class FixedNoise:
    """A loss whose ``perturb`` always returns one perturbation, so repeated estimates share their ε."""

    def __init__(self, loss, perturbation: Perturbation):
        self.loss, self.perturbation = loss, perturbation

    def perturb(self, v, generator):
        return self.perturbation

    def __getattr__(self, name):
        return getattr(self.loss, name)


EXACT_POSTERIORS = {
    "grbm": lambda model: ExactGRBMPosterior(model, sample="binary"),
    "gaussian_linear": ExactGaussianLinearPosterior,
}


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("model_name", list(EXACT))
def test_sampled_vages_matches_the_exact_gradient_in_expectation(float64, model_name, loss_name):
    """Independent particle sets and the L/(L−1) factor make the sampled VaGES gradient unbiased."""
    model, loss = EXACT[model_name][0](), LOSSES[loss_name]()
    v = 0.5 * torch.randn(8, 3)
    perturbation = _perturbation(loss, v)
    exact = _gradient(loss.at(model.score, perturbation), model)
    q = BoundPosterior(EXACT_POSTERIORS[model_name](model))
    estimator, fixed, generator = VaGESScore(n_particles=2), FixedNoise(loss, perturbation), torch.Generator()
    generator.manual_seed(1)
    draws = torch.stack([_gradient(estimator.higher_loss(model, q, fixed, v, generator), model) for _ in range(1000)])
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert (stderr > 0).all()
    assert ((mean - exact).abs() / stderr).max() < 4.5, (mean - exact) / stderr


def test_sampled_vaes_averages_to_the_exact_score(float64):
    model = random_grbm(3, 4, seed=3)
    q = BoundPosterior(ExactGRBMPosterior(model, sample="binary"))
    v = torch.randn(6, 3, requires_grad=True)
    draws = torch.stack([VaESScore(n_particles=50).score_function(model, q, torch.Generator().manual_seed(seed))(v)
                         for seed in range(200)]).detach()  # fmt: skip
    stderr = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - model.score(v).detach()).abs() / stderr).max() < 4.5


def test_biased_covariance_scales_the_covariance_term_by_l_minus_1_over_l(float64):
    """With the same draws, biased − none = (L−1)/L · (unbiased − none), exactly."""
    model, loss = random_grbm(3, 4, seed=5), DenoisingSM(sigma=0.3)
    q = BoundPosterior(ExactGRBMPosterior(model, sample="binary"))
    v = 0.5 * torch.randn(8, 3)

    def gradient(covariance):
        estimator = VaGESScore(n_particles=3, covariance=covariance)
        return _gradient(estimator.higher_loss(model, q, loss, v, torch.Generator().manual_seed(4)), model)

    none = gradient("none")
    assert not torch.allclose(gradient("unbiased"), none)
    torch.testing.assert_close(gradient("biased") - none, 2 / 3 * (gradient("unbiased") - none), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_vages_with_shared_particles_and_no_covariance_is_autograd_through_vaes(float64, loss_name):
    model, loss = random_grbm(3, 4, seed=6), LOSSES[loss_name]()
    q = BoundPosterior(ExactGRBMPosterior(model, sample="relaxed"))
    v = 0.5 * torch.randn(8, 3)
    surrogate = VaGESScore(n_particles=3, covariance="none", share_particles=True)
    through_vaes = ScoreMatching(loss, VaESScore(n_particles=3), n_unroll=0)
    via_surrogate = surrogate.higher_loss(model, q, loss, v, torch.Generator().manual_seed(2))
    via_autograd = through_vaes.higher_loss(model, q, v, torch.Generator().manual_seed(2))
    torch.testing.assert_close(via_surrogate, via_autograd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_gradient(via_surrogate, model), _gradient(via_autograd, model), rtol=1e-10, atol=1e-12)


def test_vages_value_is_the_loss_of_vaes_score(float64):
    model, loss = random_grbm(3, 4, seed=7), DenoisingSM(sigma=0.3)
    q = BoundPosterior(ExactGRBMPosterior(model, sample="relaxed"))
    v = torch.randn(8, 3)
    value = VaGESScore(n_particles=2).higher_loss(model, q, loss, v, torch.Generator().manual_seed(3))
    # the first L particles after the perturbation's draw are the z set
    generator = torch.Generator().manual_seed(3)
    perturbation = loss.perturb(v, generator)
    h = VaESScore(n_particles=6).particles(model, q, perturbation.inputs, 6, generator)[:2]
    score = mean_particle_score(model, perturbation.inputs, h, create_graph=False)
    torch.testing.assert_close(value.detach(), loss.at(lambda _: score, perturbation), rtol=1e-12, atol=1e-12)


def test_configuration_errors_name_the_key():
    with pytest.raises(ConfigError, match="n_particles"):
        ScoreMatching("dsm", "vages", n_unroll=0, n_particles=1)
    with pytest.raises(ConfigError, match="n_particles"):
        ScoreMatching("dsm", "vages", n_unroll=0, n_particles=1, covariance="biased")
    ScoreMatching("dsm", "vages", n_unroll=0, n_particles=1, covariance="none")  # nothing to estimate a covariance of
    for higher in ("ssm", "sm"):  # they differentiate the score in v, which VaES's detached particles cannot
        for estimator in ("vaes", "vages"):
            with pytest.raises(ConfigError, match=f"higher='{higher}'"):
                ScoreMatching(higher, estimator, n_unroll=0)
    with pytest.raises(ConfigError, match="n_unroll"):
        ScoreMatching("dsm", "vages", n_unroll=5)
    with pytest.raises(ConfigError, match="covariance"):
        ScoreMatching("dsm", "vages", n_unroll=0, covariance="full")
    with pytest.raises(ConfigError, match="bandwidth"):
        KernelStein(bandwidth="mean")
    with pytest.raises(ConfigError, match="objective.refine_steps"):
        ScoreMatching("dsm", "vages", n_unroll=0, refine_steps=2).check_model(random_grbm(2, 3), "binary")
    with pytest.raises(ConfigError, match="objective.estimator"):
        ScoreMatching("ksd", "importance").check_model(random_model(2, 2), "continuous")


def test_ksd_is_zero_in_expectation_at_the_data_distribution_and_positive_elsewhere():
    """Data N(0, I) in 2-D, against the score of N(0, I) and of N(0.5·1, I)."""
    loss, generator = KernelStein(bandwidth=1.0), torch.Generator().manual_seed(0)
    batches = torch.randn(2000, 50, 2, generator=generator)
    matched = torch.stack([loss.at(lambda x: -x, Perturbation(batch)) for batch in batches])
    shifted = torch.stack([loss.at(lambda x: -(x - 0.5), Perturbation(batch)) for batch in batches])
    matched_stderr = matched.std() / math.sqrt(len(matched))
    assert matched.mean().abs() < 3 * matched_stderr
    assert shifted.mean() > 10 * shifted.std() / math.sqrt(len(shifted))


def test_ksd_one_sided_surrogate_on_both_pairings_is_the_u_statistics_gradient(float64):
    model, loss = random_grbm(3, 4, seed=8), KernelStein(bandwidth=0.8)
    v = 0.5 * torch.randn(10, 3)
    swapped = torch.cat([v[5:], v[:5]])
    one_sided = _gradient(loss.at(model.score, Perturbation(v)), model)
    other_side = _gradient(loss.at(model.score, Perturbation(swapped)), model)
    u = loss.u_statistic(model.score(v.clone().requires_grad_()), loss.kernel_pairs(v)).mean()
    torch.testing.assert_close(one_sided + other_side, _gradient(u, model), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.at(model.score, Perturbation(v)), u, rtol=1e-12, atol=1e-12)


def test_ksd_leaves_an_odd_batchs_last_row_out(float64):
    model, loss = random_grbm(3, 4, seed=8), KernelStein(bandwidth=0.8)
    v = 0.5 * torch.randn(11, 3)
    odd, even = loss.at(model.score, Perturbation(v)), loss.at(model.score, Perturbation(v[:10]))
    torch.testing.assert_close(odd, even, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_gradient(odd, model), _gradient(even, model), rtol=1e-12, atol=1e-12)
    residual = loss.residual(model.score(v), Perturbation(v))
    assert residual.shape == (11, 3) and not residual[5:].any() and residual[:5].abs().min() > 0


def test_a_vages_ksd_step_computes_the_kernel_terms_once(monkeypatch):
    """The residual and the reported value share one perturbation's kernel terms (with the median bandwidth, a
    cdist and a quantile each time)."""
    model, loss = random_grbm(3, 4, seed=8), KernelStein(bandwidth="median")
    calls = []
    kernel_pairs = KernelStein.kernel_pairs
    monkeypatch.setattr(KernelStein, "kernel_pairs", lambda self, v: calls.append(v) or kernel_pairs(self, v))
    q = BoundPosterior(ExactGRBMPosterior(model, sample="binary"))
    VaGESScore(n_particles=2).higher_loss(model, q, loss, torch.randn(10, 3), torch.Generator().manual_seed(3))
    assert len(calls) == 1


def test_ksd_median_bandwidth_is_the_median_distance():
    v = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [1.0, 0.0]])
    # distances: 3, 4, 1, 5, 2, 4.12…; the median of six is the mean of the middle two, 3 and 4
    assert KernelStein(bandwidth="median")._bandwidth(v).item() == pytest.approx(3.5)


def test_importance_sampled_free_energy_with_every_state_as_a_proposal_is_exact(float64):
    model = random_grbm(3, 4, seed=9)
    v = torch.randn(6, 3)
    proposals = all_hidden_states(4).to(v.dtype)[:, None, :].expand(-1, 6, -1)
    torch.testing.assert_close(
        ImportanceSampledScore.free_energy(model, v, proposals), model.free_energy(v), rtol=1e-12, atol=1e-12
    )
    # fresh uniform proposals: exp(−F_IS) is unbiased for exp(−F)
    generator = torch.Generator().manual_seed(0)
    proposals = (torch.rand(20000, 6, 4, generator=generator) < 0.5).to(v.dtype)
    ratios = torch.exp(model.free_energy(v) - ImportanceSampledScore.free_energy(model, v, proposals[None]))  # K = 1
    assert ((ratios.mean(0) - 1).abs() / (ratios.std(0) / math.sqrt(len(ratios)))).max() < 4.5
    score = ImportanceSampledScore(n_proposals=3).score_function(model, None, torch.Generator())
    assert score(v.requires_grad_()).shape == (6, 3)


def test_latent_refinement_takes_langevin_steps_with_the_features_computed_once():
    model = LatentEBM(image_shape=(1, 8, 8), h_dim=3, channels=4)
    calls = []
    model.resnet.register_forward_hook(lambda *args: calls.append(1))
    v = torch.rand(5, 64)
    h0 = torch.randn(4, 5, 3)

    class FixedParticles:
        def __call__(self, v):
            return None

        def rsample(self, dist, n, generator):
            return h0[:n]

        def latent(self, sample):
            return sample

    estimator = VaESScore(n_particles=4, refine_steps=3, refine_step_size=0.1, refine_noise=0.0)
    refined = estimator.particles(model, FixedParticles(), v, 4, torch.Generator())
    assert len(calls) == 1
    expected = h0
    for _ in range(3):
        h = expected.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(v, h).sum(), h)
        expected = expected - 0.05 * grad
    torch.testing.assert_close(refined, expected)
    assert not torch.allclose(refined, h0)
    # with noise: each step adds σ_r ξ, ξ drawn from the training generator
    noisy = VaESScore(n_particles=4, refine_steps=1, refine_step_size=0.1, refine_noise=0.3)
    refined = noisy.particles(model, FixedParticles(), v, 4, torch.Generator().manual_seed(5))
    h = h0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(v, h).sum(), h)
    xi = torch.randn(h0.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(refined, h0 - 0.05 * grad + 0.3 * xi)
