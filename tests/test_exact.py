"""Exact identities of the score-matching family, the lower losses, CD, the unroll and the gradient bias.

Where an identity holds exactly it is tested exactly: float64, shared noise (generators seeded identically, or
the noise reproduced by hand from the same seed) and tolerances of about 1e-10, not within Monte Carlo error.
Only the CD test and the gradient bias are statistical, and there the reference itself is exact (enumeration of
the hidden states, closed-form Gaussian moments).
"""

from __future__ import annotations

import copy
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.distributions.relaxed_bernoulli import LogitRelaxedBernoulli

from eblvm.bilevel.module import BilevelModule
from eblvm.bilevel.optim import SGD, Adam, OptimConfig
from eblvm.bilevel.unroll import unroll
from eblvm.evaluation.posterior import gradient_bias, kl_divergence, posterior_gap
from eblvm.objectives import ContrastiveDivergence, ScoreMatching
from eblvm.objectives.estimators import BiSMScore
from eblvm.objectives.lower import importance_weighted_loss
from eblvm.objectives.score_losses import MultiscaleDSM, SlicedSM, score_matching
from eblvm.posteriors import BoundPosterior, ExactGRBMPosterior, RelaxedBernoulliPosterior
from tests.test_grbm import all_hidden_states, random_grbm

EXACT = {"rtol": 1e-10, "atol": 1e-10}


pytestmark = pytest.mark.usefixtures("one_thread")


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


def _energy_gradient(loss: torch.Tensor, params) -> torch.Tensor:
    """One gradient vector; a parameter the loss does not reach (c, for BiSM with binary h) has gradient 0."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads, strict=True)])


def _exact_posterior(model, sample: str) -> BoundPosterior:
    """The GRBM's exact posterior; relaxed draws use the exact logits and the authors' Bernoulli log-mass."""
    return BoundPosterior(ExactGRBMPosterior(model, sample=sample))


# 1. BiDSM / BiMDSM with the exact posterior is DSM / MDSM, draw by draw --------------------------------------


@pytest.mark.parametrize("n_particles", [1, 3])
@pytest.mark.parametrize("sample", ["binary", "relaxed"])
@pytest.mark.parametrize(
    "higher, settings",
    [("dsm", {"sigma": 0.3}), ("mdsm", {"sigma_begin": 0.05, "sigma_end": 1.2, "noise_grid": "geometric"})],
)
def test_bism_with_the_exact_posterior_equals_the_exact_score_loss_and_gradient(
    float64, higher, settings, sample, n_particles
):
    """Both losses draw ε first from identically seeded generators, so they see the same ṽ; since
    −E(v,h) − log q(h|v) = −F(v) for every h, BiSM's score is −∇F(ṽ) for every particle and the losses and
    their gradients in every model parameter agree to rounding."""
    model = random_grbm(3, 4, seed=50)
    v = torch.randn(16, 3, generator=torch.Generator().manual_seed(51))
    bism = ScoreMatching(higher=higher, estimator="bism", n_particles=n_particles, **settings)
    exact = ScoreMatching(higher=higher, estimator="exact", **settings)
    q = _exact_posterior(model, sample)
    params = list(model.parameters())
    for seed in range(3):
        bism_loss = bism.higher_loss(model, q, v, torch.Generator().manual_seed(seed))
        exact_loss = exact.higher_loss(model, None, v, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(bism_loss, exact_loss, **EXACT)
        bism_grad = _flat(torch.autograd.grad(bism_loss, params))
        exact_grad = _flat(torch.autograd.grad(exact_loss, params))
        torch.testing.assert_close(bism_grad, exact_grad, **EXACT)
        assert exact_grad.norm() > 1e-3  # a real comparison, not 0 == 0


# 2. With the exact posterior the IWAE bound is tight for every k ---------------------------------------------


@pytest.mark.parametrize("sample", ["binary", "relaxed"])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_importance_weighted_loss_with_the_exact_posterior_is_the_free_energy(float64, sample, k):
    """Every log weight −E(v,h_k) − log q(h_k|v) is −F(v), so −[logsumexp_k − log k] = F(v) per row."""
    model = random_grbm(3, 5, seed=52, scale=2.0)
    v = torch.randn(12, 3, generator=torch.Generator().manual_seed(53))
    q = _exact_posterior(model, sample)
    loss = importance_weighted_loss(model, q, v, k, torch.Generator().manual_seed(k))
    assert loss.shape == (12,)
    torch.testing.assert_close(loss, model.free_energy(v), **EXACT)


# 3. MDSM's grids and the lower loss's row weights -------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_mdsm_noise_grids_include_both_endpoints(float64, batch):
    v = torch.zeros(batch, 2)
    begin, end = 0.05, 1.2
    linear = MultiscaleDSM(begin, end, noise_grid="linear").levels(v)
    geometric = MultiscaleDSM(begin, end, noise_grid="geometric").levels(v)
    assert linear.shape == geometric.shape == (batch, 1)
    torch.testing.assert_close(linear[:, 0], torch.linspace(begin, end, batch), rtol=1e-12, atol=1e-12)
    expected = torch.exp(torch.linspace(math.log(begin), math.log(end), batch))
    torch.testing.assert_close(geometric[:, 0], expected, rtol=1e-12, atol=1e-12)
    if batch > 1:
        assert linear[0, 0] == pytest.approx(begin, abs=1e-15) and linear[-1, 0] == pytest.approx(end, abs=1e-15)
        assert geometric[0, 0] == pytest.approx(begin, rel=1e-14)
        assert geometric[-1, 0] == pytest.approx(end, rel=1e-14)


def test_mdsm_geometric_grid_is_computed_in_the_data_dtype():
    v = torch.zeros(7, 2, dtype=torch.float64)  # default dtype float32 here
    grid = MultiscaleDSM(0.05, 1.2, noise_grid="geometric").levels(v)[:, 0]
    expected = torch.exp(torch.linspace(math.log(0.05), math.log(1.2), 7, dtype=torch.float64))
    assert grid.dtype == torch.float64
    torch.testing.assert_close(grid, expected, rtol=1e-12, atol=1e-12)


def _lower_loss_by_hand(model, posterior, v, higher, sigma_setting, iwae_k, seed):
    """The lower loss of ScoreMatching, drawn by hand: ε first (perturb), then the relaxed-Bernoulli noise u
    (the lower loss's rsample); each row's negative IWAE bound, weighted by 1/σ_i for MDSM, then the mean."""
    generator = torch.Generator().manual_seed(seed)
    batch = v.shape[0]
    if higher == "mdsm":
        begin, end, grid = sigma_setting
        if grid == "linear":
            sigma = torch.linspace(begin, end, batch)
        else:
            sigma = torch.exp(torch.linspace(math.log(begin), math.log(end), batch))
    else:
        sigma = torch.full((batch,), sigma_setting)
    eps = torch.randn(v.shape, generator=generator)
    noisy = v + sigma[:, None] * eps
    logits = posterior(noisy)
    u = torch.rand((iwae_k,) + logits.shape, generator=generator)
    u = u.clamp(torch.finfo(u.dtype).tiny, 1 - torch.finfo(u.dtype).eps)
    h = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / posterior.temperature)
    log_q = (h * F.logsigmoid(logits) + (1 - h) * F.logsigmoid(-logits)).sum(-1)
    energy = 0.5 * ((noisy - model.b) ** 2 / model.variance).sum(-1) - h @ model.c - ((noisy @ model.W) * h).sum(-1)
    per_row = -(torch.logsumexp(-energy - log_q, 0) - math.log(iwae_k))
    weights = 1 / sigma if higher == "mdsm" else torch.ones(batch)
    return (per_row * weights).mean()


@pytest.mark.parametrize("lower, iwae_k", [("elbo", 1), ("iwae", 3)])
@pytest.mark.parametrize(
    "higher, sigma_setting", [("mdsm", (0.1, 1.0, "linear")), ("mdsm", (0.1, 1.0, "geometric")), ("dsm", 0.3)]
)
def test_lower_loss_is_the_weighted_mean_of_per_row_bounds_on_perturbed_rows(
    float64, higher, sigma_setting, lower, iwae_k
):
    torch.manual_seed(54)
    model = random_grbm(3, 4, seed=54)
    posterior = RelaxedBernoulliPosterior(3, 4, temperature=0.5)  # a learned (wrong) q: per_row depends on h
    if higher == "mdsm":
        begin, end, grid = sigma_setting
        settings = {"sigma_begin": begin, "sigma_end": end, "noise_grid": grid}
    else:
        settings = {"sigma": sigma_setting}
    objective = ScoreMatching(higher=higher, estimator="bism", lower=lower, iwae_k=iwae_k, **settings)
    v = torch.randn(9, 3, generator=torch.Generator().manual_seed(55))
    for seed in range(2):
        loss = objective.lower_loss(model, BoundPosterior(posterior), v, torch.Generator().manual_seed(seed))
        expected = _lower_loss_by_hand(model, posterior, v, higher, sigma_setting, iwae_k, seed)
        torch.testing.assert_close(loss, expected, **EXACT)
        (grad,) = torch.autograd.grad(loss, [posterior.logits.weight])
        (expected_grad,) = torch.autograd.grad(expected, [posterior.logits.weight])
        torch.testing.assert_close(grad, expected_grad, **EXACT)


# 4. SSM averaged over every Rademacher probe is exact SM -----------------------------------------------------


@pytest.mark.parametrize("score", ["exact", "bism"])
@pytest.mark.parametrize("d", [2, 3])
def test_ssm_averaged_over_all_rademacher_probes_is_exact_sm(float64, d, score):
    """Σ_u uᵀJu / 2^d = tr J exactly over u ∈ {±1}^d (the off-diagonal terms cancel in pairs)."""
    model = random_grbm(d, 4, seed=56, scale=1.5)
    v = torch.randn(7, d, generator=torch.Generator().manual_seed(57))
    if score == "exact":
        score_fn = model.score
    else:  # BiSM's score with the exact posterior: its input Jacobian is the Hessian of −F, particle by particle
        score_fn = BiSMScore(n_particles=3).score_function(
            model, _exact_posterior(model, "relaxed"), torch.Generator().manual_seed(0)
        )
    probes = [torch.tensor(signs).expand(v.shape) for signs in itertools.product([-1.0, 1.0], repeat=d)]
    averaged = sum(SlicedSM().with_probe(score_fn, v, probe) for probe in probes) / len(probes)
    exact = score_matching(model.score, v)
    torch.testing.assert_close(averaged, exact, **EXACT)
    one_probe = SlicedSM().with_probe(score_fn, v, probes[1])
    assert (one_probe - exact).abs() > 1e-3  # a single probe is only unbiased


# 5. The Binary-Concrete log-density from the pre-sigmoid value --------------------------------------------------


def _concrete_reference(x: torch.Tensor, logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Density of h = sigmoid(x): the logistic density of x (torch's LogitRelaxedBernoulli) over dh/dx = h(1−h)."""
    log_density_x = LogitRelaxedBernoulli(torch.tensor(tau, dtype=x.dtype), logits=logits).log_prob(x)
    return (log_density_x - F.logsigmoid(x) - F.logsigmoid(-x)).sum(-1)


def _concrete_posterior(kind: str, tau: float):
    if kind == "relaxed":
        return RelaxedBernoulliPosterior(3, 4, temperature=tau, log_prob="concrete")
    model = random_grbm(3, 4, seed=58)
    return ExactGRBMPosterior(model, temperature=tau, log_prob="concrete", sample="relaxed")


def _saturating_logits(dtype) -> torch.Tensor:
    """Logits from moderate to huge (scale 30), so that many draws have |x| > 40 at either temperature."""
    generator = torch.Generator().manual_seed(59)
    scales = torch.tensor([0.5, 3.0, 30.0], dtype=dtype).repeat_interleave(20)[:, None]
    return scales * torch.randn(60, 4, generator=generator, dtype=dtype)


@pytest.mark.parametrize("kind", ["relaxed", "exact"])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_concrete_log_prob_equals_the_closed_form_in_float64(float64, kind, tau):
    posterior = _concrete_posterior(kind, tau)
    logits = _saturating_logits(torch.float64)
    x = posterior.rsample(logits, 5, torch.Generator().manual_seed(60))
    assert x.shape == (5, 60, 4)
    assert int((x.abs() > 40).sum()) > 100  # saturated draws are in the test
    torch.testing.assert_close(posterior.log_prob(x, logits), _concrete_reference(x, logits, tau), **EXACT)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_concrete_log_prob_stays_finite_in_float32_where_a_form_through_h_does_not(tau):
    posterior = _concrete_posterior("relaxed", tau)
    logits = _saturating_logits(torch.float32)
    x = posterior.rsample(logits, 5, torch.Generator().manual_seed(61))
    assert x.dtype == torch.float32
    h = torch.sigmoid(x)
    assert int((h == 1.0).sum()) > 0 and int((h == 0.0).sum()) > 0  # rounded away in h
    through_h = (LogitRelaxedBernoulli(torch.tensor(tau), logits=logits).log_prob(x) - h.log() - (-h).log1p()).sum(-1)
    assert not torch.isfinite(through_h).all()
    log_prob = posterior.log_prob(x, logits)
    assert torch.isfinite(log_prob).all()
    # and it is the float64 value up to float32 rounding of its terms (|x| up to a few hundred)
    reference = _concrete_reference(x.double(), logits.double(), tau)
    scale = (x.double().abs() + logits.double().abs() / tau + 1).sum(-1)
    assert ((log_prob.double() - reference).abs() <= 8 * torch.finfo(torch.float32).eps * scale).all()


# 6. CD-k against the exact log-likelihood gradient ----------------------------------------------------------


def _model_expectation_of_energy_gradient(model) -> torch.Tensor:
    """E_{p(v,h)}[∇_θ E(v,h)] for θ = (W, b, c, log σ), by enumerating h and integrating v | h in closed form.

    p(h) ∝ exp(cᵀh + bᵀu + ½‖σ⊙u‖²) with u = Wh; v | h ~ N(μ, diag σ²), μ = b + σ²⊙u. With
    ∂E/∂W_ij = −v_i h_j, ∂E/∂b_i = −(v_i − b_i)/σ_i², ∂E/∂c_j = −h_j, ∂E/∂log σ_i = −(v_i − b_i)²/σ_i²:
    E[v_i | h] = μ_i and E[(v_i − b_i)² | h] = (σ_i² u_i)² + σ_i².
    """
    with torch.no_grad():
        h = all_hidden_states(model.h_dim)
        u = h @ model.W.T
        variance = model.variance
        p_h = torch.softmax(h @ model.c + u @ model.b + 0.5 * (variance * u**2).sum(-1), 0)
        mean_v = model.b + variance * u
        grad_w = -(p_h[:, None, None] * mean_v[:, :, None] * h[:, None, :]).sum(0)
        grad_b = -(p_h[:, None] * u).sum(0)
        grad_c = -(p_h[:, None] * h).sum(0)
        grad_log_sigma = -(p_h[:, None] * (variance * u**2 + 1)).sum(0)
    return torch.cat([grad_w.flatten(), grad_b, grad_c, grad_log_sigma])


def _cd_problem():
    model = random_grbm(2, 3, seed=30, scale=2.0)
    params = [model.W, model.b, model.c, model.log_sigma]
    data = torch.rand(40, 2, generator=torch.Generator().manual_seed(62))  # far from the model's density
    return model, params, data


def test_exact_log_likelihood_gradient_by_enumeration(float64):
    """−mean ∇F(v) + E_model[∇E] equals autograd of mean(−F(v)) − log Z (both exact)."""
    model, params, data = _cd_problem()
    free_energy_grad = _flat(torch.autograd.grad(model.free_energy(data).mean(), params))
    by_moments = -free_energy_grad + _model_expectation_of_energy_gradient(model)
    by_autograd = _flat(torch.autograd.grad((-model.free_energy(data)).mean() - model.log_partition(), params))
    torch.testing.assert_close(by_moments, by_autograd, **EXACT)


def _cd_gradient_draws(k: int, chains_per_row: int, repeats: int):
    """Per-repeat autograd gradients of CD-k's loss mean F(v) − mean F(v_k), each over ``40 × chains_per_row``
    chains; and the exact gradient of the negative mean log-likelihood it estimates."""
    model, params, data = _cd_problem()
    cd = ContrastiveDivergence(k)
    v = data.repeat(chains_per_row, 1)
    draws = torch.stack(
        [
            _flat(torch.autograd.grad(cd.higher_loss(model, None, v, torch.Generator().manual_seed(r)), params))
            for r in range(repeats)
        ]
    )
    free_energy_grad = _flat(torch.autograd.grad(model.free_energy(data).mean(), params))
    exact_nll_grad = free_energy_grad - _model_expectation_of_energy_gradient(model)
    return draws.mean(0), draws.std(0) / math.sqrt(repeats), exact_nll_grad


def test_cd_with_long_chains_is_unbiased_and_cd1_is_not(float64):
    mean, stderr, exact = _cd_gradient_draws(k=200, chains_per_row=50, repeats=16)
    assert (stderr.norm() / exact.norm()) < 0.01  # a precise comparison
    z_long = (mean - exact) / stderr
    assert z_long.abs().max() < 4, z_long  # each of the 13 components within 4 standard errors

    mean, stderr, exact = _cd_gradient_draws(k=1, chains_per_row=50, repeats=16)
    z_short = (mean - exact) / stderr
    # CD-1's bias on this model: about 40% of the gradient's norm, 17 to 98 standard errors per component (the
    # norm of the difference is about 70 times that of the standard errors); k = 20 is already unbiased here
    assert (mean - exact).norm() > 0.2 * exact.norm()
    assert z_short.abs().max() > 10, z_short
    assert (mean - exact).norm() > 10 * stderr.norm()


# 7. The optimizers, and the unroll's use of q's scheduled learning rate ---------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs", "options"),
    [
        (Adam, torch.optim.Adam, {"lr": 0.05, "betas": (0.9, 0.95), "weight_decay": 0.01}),
        (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.01}),
        (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.5}),
        (SGD, torch.optim.SGD, {"lr": 0.1}),
    ],
    ids=["adam", "sgd-momentum-decay", "sgd-momentum", "sgd"],
)
@pytest.mark.parametrize("set_to_none", [True, False], ids=["grads-dropped", "grads-zeroed-in-place"])
def test_the_tensor_list_optimizers_step_as_torch_optim_does(float64, ours, theirs, options, set_to_none):
    """eblvm's Adam and SGD (the unroll's update rules, applied in place) against torch.optim's, over steps in
    which one parameter has no gradient on alternate steps (dropped gradients: it must be skipped, its state
    untouched), and with gradients zeroed in place between steps (no kept state may be a gradient tensor)."""
    start = [torch.randn(3, 2, generator=torch.Generator().manual_seed(70)), torch.randn(2)]
    weights = {kind: [w.clone().requires_grad_(True) for w in start] for kind in ("ours", "theirs")}
    optimizers = {"ours": ours(weights["ours"], **options), "theirs": theirs(weights["theirs"], **options)}
    for step in range(6):
        for kind, (matrix, vector) in weights.items():
            optimizers[kind].zero_grad(set_to_none=set_to_none)
            loss = (matrix**3).sum() + (0 if step % 2 else (vector.sin() * matrix[0]).sum())
            loss.backward()
            optimizers[kind].step()
        for mine, reference in zip(weights["ours"], weights["theirs"], strict=True):
            torch.testing.assert_close(mine, reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("optimizer", [Adam, SGD], ids=["adam", "sgd"])
def test_a_masked_member_gets_no_gradient_and_no_weight_decay(float64, optimizer):
    """An ensemble's masked member (a non-finite gradient here) keeps its parameters and its state gets a zero
    gradient, weight decay included, while the active member steps as it would alone."""
    start = torch.randn(2, 3, generator=torch.Generator().manual_seed(71))
    stacked, alone = start.clone().requires_grad_(True), start[0].clone().requires_grad_(True)
    options = {"lr": 0.05, "weight_decay": 0.1} | ({"momentum": 0.5} if optimizer is SGD else {})
    ensemble, single = optimizer([stacked], **options), optimizer([alone], **options)
    ensemble.param_groups[0]["member_mask"] = torch.tensor([True, False])
    for _ in range(3):
        stacked.grad = torch.stack([(start[0] ** 2).sum() * torch.ones(3), torch.full((3,), float("nan"))])
        alone.grad = (start[0] ** 2).sum() * torch.ones(3)
        ensemble.step()
        single.step()
    assert torch.equal(stacked[1], start[1])
    torch.testing.assert_close(stacked[0], alone, rtol=0, atol=1e-12)
    for name, value in ensemble.state[stacked].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value[1], torch.zeros(3)), name
            torch.testing.assert_close(value[0], single.state[alone][name], rtol=0, atol=1e-12)


def test_unroll_takes_the_adam_step_at_the_cosine_scheduled_learning_rate(float64):
    total_steps, t = 10, 7
    config = OptimConfig(scheduler="cosine", lr=1e-3, posterior_lr=0.05, min_lr=1e-3)
    model = random_grbm(3, 4, seed=63)
    posterior = RelaxedBernoulliPosterior(3, 4)
    module = BilevelModule(model, posterior, ScoreMatching(higher="dsm", estimator="bism"), config)
    module.trainer = SimpleNamespace(max_steps=total_steps)
    optimizers, schedulers = module.configure_optimizers()
    optimizer, scheduler = optimizers[1], schedulers[1]
    assert type(optimizer) is Adam and optimizer.param_groups[0]["betas"] == (0.9, 0.95)

    inputs = torch.randn(6, 3, generator=torch.Generator().manual_seed(64))
    targets = torch.randn(6, 4, generator=torch.Generator().manual_seed(65))

    def quadratic(q: BoundPosterior) -> torch.Tensor:
        return 0.5 * ((q(inputs) - targets) ** 2).sum()

    for _ in range(t):  # real steps then schedule, as in BilevelModule._lower_level
        optimizer.zero_grad()
        quadratic(BoundPosterior(posterior)).backward()
        optimizer.step()
        scheduler.step()
    lr_t = config.min_lr + (config.posterior_lr - config.min_lr) * (1 + math.cos(math.pi * t / total_steps)) / 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_t, rel=1e-12)
    assert lr_t < 0.5 * config.posterior_lr  # the schedule matters

    names = [name for name, _ in posterior.named_parameters()]
    grads = torch.autograd.grad(quadratic(BoundPosterior(posterior)), list(posterior.parameters()))
    grads = dict(zip(names, grads, strict=True))
    beta1, beta2 = optimizer.param_groups[0]["betas"]
    eps = optimizer.param_groups[0]["eps"]
    updates = {}
    for name, param in posterior.named_parameters():
        state = optimizer.state[param]
        assert float(state["step"]) == t
        step = t + 1
        exp_avg = beta1 * state["exp_avg"] + (1 - beta1) * grads[name]
        exp_avg_sq = beta2 * state["exp_avg_sq"] + (1 - beta2) * grads[name] ** 2
        updates[name] = (exp_avg / (1 - beta1**step)) / ((exp_avg_sq / (1 - beta2**step)).sqrt() + eps)
    before = {name: p.detach().clone() for name, p in posterior.named_parameters()}
    q = unroll(posterior, optimizer, quadratic, 1)
    for name in names:
        torch.testing.assert_close(q.params[name], before[name] - lr_t * updates[name], **EXACT)
        at_initial_lr = before[name] - config.posterior_lr * updates[name]
        assert (q.params[name] - at_initial_lr).abs().max() > 1e-3  # the unscheduled step is far off
    assert all(torch.equal(before[n], p) for n, p in posterior.named_parameters())


# 8. The gradient bias against exactly computed ones ----------------------------------------------------------


def _noisy_input(v, sigma, seed):
    """gradient_bias's repeat ``r`` draws DSM's ε first from a generator seeded ``seed + r``."""
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(v.shape, generator=generator)
    return v + sigma * eps, eps, generator


def _bism_dsm_rows(model, q_module, noisy, eps, sigma, h):
    """Per-(state, row) BiDSM loss ½‖s(ṽ) + ε/σ‖² with s = ∇_v[−E(ṽ,h) − log q(h|ṽ)] at given binary h."""
    shape = torch.broadcast_shapes(h.shape[:-1], noisy.shape[:-1]) + noisy.shape[-1:]
    inputs = noisy.detach().expand(shape).requires_grad_(True)
    log_joint = -model(inputs, h) - q_module.log_prob(h, q_module(inputs))
    (score,) = torch.autograd.grad(log_joint.sum(), inputs, create_graph=True)
    return 0.5 * ((score + eps / sigma) ** 2).sum(-1)


def _gradient_bias_by_hand(model, q_module, v, sigma, repeats, seed) -> dict[str, float]:
    """The exact conditional bias ``‖(1/R) Σ_r (E_h[g_r] − g*_r)‖`` (E_h by enumerating the 2^m states with
    weights q(h|ṽ_r)), and gradient_bias's estimate, its noise correction tr Cov(d)/R, standard error and
    relative bias recomputed from the same draws (ε_r, then BiSMScore's u_r, from a generator seeded seed + r)."""
    params = list(model.parameters())
    states = all_hidden_states(model.h_dim)[:, None, :]
    exact_differences, differences, references = [], [], []
    for r in range(repeats):
        noisy, eps, generator = _noisy_input(v, sigma, seed + r)
        reference = _energy_gradient(0.5 * ((model.score(noisy) + eps / sigma) ** 2).sum(-1).mean(), params)
        logits = q_module(noisy)
        weights = (states * F.logsigmoid(logits) + (1 - states) * F.logsigmoid(-logits)).sum(-1).exp().detach()
        torch.testing.assert_close(weights.sum(0), torch.ones(v.shape[0]), rtol=1e-12, atol=1e-12)
        expected_loss = (weights * _bism_dsm_rows(model, q_module, noisy, eps, sigma, states)).sum(0).mean()
        exact_differences.append(_energy_gradient(expected_loss, params) - reference)
        u = torch.rand((1,) + logits.shape, generator=generator)  # BiSMScore's draw, after ε
        h = (u < torch.sigmoid(logits)).to(v.dtype)
        sampled = _energy_gradient(_bism_dsm_rows(model, q_module, noisy, eps, sigma, h).mean(), params)
        differences.append(sampled - reference)
        references.append(reference)
    differences = torch.stack(differences)
    mean = differences.mean(0)
    noise = differences.var(0).sum() / repeats
    estimate = torch.sqrt((mean.square().sum() - noise).clamp_min(0))
    stderr = (differences @ (mean / mean.norm().clamp_min(1e-300))).std() / math.sqrt(repeats)
    return {
        "exact": float(torch.stack(exact_differences).mean(0).norm()),
        "bias": float(estimate),
        "noise": float(noise),
        "stderr": float(stderr),
        "relative_bias": float(estimate / torch.stack(references).mean(0).norm()),
    }


def _bias_problem():
    model = random_grbm(2, 3, seed=66, scale=1.5)
    v = torch.rand(50, 2, generator=torch.Generator().manual_seed(67))
    objective = ScoreMatching(higher="dsm", estimator="bism", sigma=0.3, n_lower_steps=0, n_unroll=0)
    return model, v, objective


def test_gradient_bias_of_a_wrong_fixed_posterior_matches_the_exact_bias(float64):
    model, v, objective = _bias_problem()
    other = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        other.W.add_(torch.randn(other.W.shape, generator=torch.Generator().manual_seed(68)))
        other.c.add_(torch.randn(other.c.shape, generator=torch.Generator().manual_seed(69)))
    posterior = ExactGRBMPosterior(other, sample="binary")  # a fixed, wrong q without weights
    repeats, seed = 100, 3
    result = gradient_bias(model, posterior, None, objective, v, repeats=repeats, seed=seed)
    by_hand = _gradient_bias_by_hand(model, posterior, v, 0.3, repeats, seed)
    # the estimator's arithmetic, reproduced draw by draw
    for key in ("bias", "stderr", "relative_bias"):
        assert getattr(result, key) == pytest.approx(by_hand[key], rel=1e-10, abs=1e-12), key
    # The exact bias is clearly non-zero, and the estimate agrees with it within its error. Slack: the estimator
    # subtracts tr Cov(d)/R, and Cov(d) also holds the spread over ε of E_h[d_r | ε_r], which is no noise for the
    # exact value (conditional on these R draws of ε); that lowers bias² by at most tr Cov(d)/R, i.e. bias by at
    # most tr Cov(d)/(2R·bias).
    exact = by_hand["exact"]
    slack = by_hand["noise"] / (2 * result.bias)
    assert exact > 10 * result.stderr
    assert abs(result.bias - exact) < 4 * result.stderr + slack


def test_gradient_bias_with_the_exact_posterior_is_zero(float64):
    model, v, objective = _bias_problem()
    posterior = ExactGRBMPosterior(model, sample="binary")
    repeats, seed = 20, 5
    result = gradient_bias(model, posterior, None, objective, v, repeats=repeats, seed=seed)
    assert _gradient_bias_by_hand(model, posterior, v, 0.3, repeats, seed)["exact"] < 1e-12
    assert result.bias <= 3 * result.stderr + 1e-12  # rounding alone: each g_r equals g*_r to ~1e-16
    assert result.relative_bias < 1e-10
    assert float(posterior_gap(model, posterior, v)) < 1e-12


def test_the_bernoulli_kl_stays_finite_where_the_exact_posterior_saturates():
    """KL between factorised Bernoullis from their logits: torch's own in float64, where nothing rounds, and
    finite in float32 where p's probability rounds to 1 (logit 30), which torch's formula turns into inf (a
    BiSSM ensemble member's test posterior gap at 100k steps)."""
    a, b = torch.tensor([[5.0, -3.0, 0.5]]), torch.tensor([[30.0, -2.0, 1.0]])

    def bernoulli(logits):
        return torch.distributions.Independent(torch.distributions.Bernoulli(logits=logits), 1)

    assert torch.isinf(torch.distributions.kl_divergence(bernoulli(a), bernoulli(b))).all()
    reference = torch.distributions.kl_divergence(bernoulli(a.double()), bernoulli(b.double()))
    torch.testing.assert_close(kl_divergence(bernoulli(a), bernoulli(b)).double(), reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(kl_divergence(bernoulli(a.double()), bernoulli(b.double())), reference)
