"""Annealed Langevin dynamics: exact stationary moments of the discretised chain on Gaussian energies, the
temperature schedule, the denoising step, and the three sampling modes."""

from __future__ import annotations

import math

import pytest
import torch

from eblvm.errors import ConfigError
from eblvm.sampling import LangevinSchedule, annealed_langevin, langevin_sample
from tests.models import GaussianLinear


def plain(step_size: float, n_steps: int, temperature: float = 1.0) -> LangevinSchedule:
    """``n_steps`` Langevin steps at a constant ``temperature``, no denoising."""
    return LangevinSchedule(
        step_size=step_size,
        hot_steps=n_steps,
        hot_temperature=temperature,
        anneal_steps=0,
        cool_steps=0,
        denoise_sigma=None,
    )


def discretised_covariance(precision: torch.Tensor, step_size: float, temperature: float = 1.0) -> torch.Tensor:
    """Stationary covariance of ``x' = x − ½σ²P(x − μ) + √T·σξ`` on ``E = ½(x−μ)ᵀP(x−μ)``.

    With ``M = I − ½σ²P`` (symmetric, commuting with P), ``C = M C M + Tσ²I`` gives ``C = Tσ²(I − M²)⁻¹``: the
    matrix form of the scalar derivation in ``test_gaussian_stationary_moments``.
    """
    m = torch.eye(len(precision)) - 0.5 * step_size**2 * precision
    return temperature * step_size**2 * torch.linalg.inv(torch.eye(len(precision)) - m @ m)


def assert_moments(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, n_se: float = 5.0) -> None:
    """Sample mean and covariance of ``(N, d)`` independent chains within ``n_se`` Monte Carlo standard errors.

    For Gaussian samples, ``se(mean_i) = √(C_ii/N)`` and ``se(cov_ij) = √((C_ii C_jj + C_ij²)/N)``.
    """
    n = samples.shape[0]
    var = cov.diagonal()
    mean_se = (var / n).sqrt()
    cov_se = ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    assert ((samples.mean(0) - mean).abs() <= n_se * mean_se).all(), (samples.mean(0), mean)
    assert ((torch.cov(samples.T) - cov).abs() <= n_se * cov_se).all(), (torch.cov(samples.T), cov)


class FreeGaussianLinear(GaussianLinear):
    """``GaussianLinear`` with its latent integrated out: ``v ~ N(0, I + AAᵀ)``, ``F(v) = ½vᵀ(I + AAᵀ)⁻¹v``."""

    has_free_energy = True

    def precision(self) -> torch.Tensor:
        return torch.linalg.inv(torch.eye(self.v_dim) + self.A @ self.A.T)

    def free_energy(self, v):
        return 0.5 * ((v @ self.precision()) * v).sum(-1)


class ExactPosterior:
    """A stand-in for ``q``: ``q(v)`` gives the exact Gaussian posterior of a ``GaussianLinear``."""

    def __init__(self, model: GaussianLinear):
        self.model = model

    def __call__(self, v):
        return self.model.posterior_mean_and_cov(v)

    def mean(self, dist):
        return dist[0]


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_gaussian_stationary_moments(float64, temperature):
    """On ``E(x) = ½‖x − μ‖²/s²`` one step is ``x' = x − a(x − μ) + √T·σξ`` with ``a = σ²/(2s²)``.

    With ``y = x − μ``: ``y' = (1 − a)y + √T·σξ``, so ``E[y'] = (1 − a)E[y] → 0`` (mean μ) and, ξ being
    independent of y, ``Var y' = (1 − a)² Var y + Tσ²``, whose fixed point is ``Tσ² / (1 − (1 − a)²)``: exactly
    the stationary variance of the discretised chain (the continuous-time value is ``Ts²``; here, with
    ``σ = 0.5, s = 1``, the two differ by 6.7%, about 10 standard errors). Both transients decay as
    ``(1 − a)^n``, so after 250 steps (``a = 1/8``) the chains are stationary to 1e-14.
    """
    mu, s, sigma = torch.tensor([1.0, -2.0, 3.0]), 1.0, 0.5
    a = sigma**2 / (2 * s**2)
    variance = temperature * sigma**2 / (1 - (1 - a) ** 2)
    generator = torch.Generator().manual_seed(0)
    init = LangevinSchedule().initial((20000, 3), generator, mu)
    (x,) = annealed_langevin(
        lambda x: 0.5 * ((x - mu) ** 2).sum(-1) / s**2, (init,), plain(sigma, 250, temperature), generator
    )
    assert_moments(x, mu, variance * torch.eye(3))


def test_default_temperatures():
    """500 steps at 100, 2000 steps ``100·100^(−k/2000)``, 200 steps ``linspace(1, 0, 200)``."""
    temperatures = LangevinSchedule().temperatures()
    assert temperatures.shape == (2700,)
    assert (temperatures[:501] == 100).all()
    assert temperatures[500 + 1000].item() == pytest.approx(10.0)  # k = 1000: 100·100^(−1/2)
    assert temperatures[2499].item() == pytest.approx(100 ** (1 / 2000))  # k = 1999: T = 1 is never reached
    assert temperatures[2499] > 1
    assert (temperatures[2500:].diff() < 0).all()
    assert temperatures[2500].item() == 1.0
    assert temperatures[-1].item() == 0.0


def test_plain_schedule_is_constant():
    assert torch.equal(plain(0.1, 7, 3.0).temperatures(), torch.full((7,), 3.0, dtype=torch.float64))


def test_denoising_step_is_exact(float64):
    """With no Langevin step, the run is the single step ``x ← x − σ0²∇_x E``, applied to every tensor.

    ``E(x, y) = ½Σ c⊙x² + bᵀx + x₀y₀ + ½‖y‖²``: ``∇_x E = c⊙x + b + y₀e₀``, ``∇_y E = y + x₀e₀``.
    """
    c, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, -1.0, 0.0])
    x, y = torch.randn(4, 3), torch.randn(4, 2)

    def energy(x, y):
        return 0.5 * (c * x**2).sum(-1) + x @ b + x[:, 0] * y[:, 0] + 0.5 * (y**2).sum(-1)

    schedule = LangevinSchedule(hot_steps=0, anneal_steps=0, cool_steps=0, denoise_sigma=0.1)
    x_new, y_new = annealed_langevin(energy, (x, y), schedule, None)
    grad_x = c * x + b + torch.nn.functional.pad(y[:, :1], (0, 2))
    grad_y = y + torch.nn.functional.pad(x[:, :1], (0, 1))
    torch.testing.assert_close(x_new, x - 0.01 * grad_x, rtol=0, atol=1e-15)
    torch.testing.assert_close(y_new, y - 0.01 * grad_y, rtol=0, atol=1e-15)


@pytest.mark.parametrize("denoise_sigma", [0.0, None])
def test_no_steps_and_no_denoising_returns_the_start(denoise_sigma):
    x = torch.randn(4, 3)
    schedule = LangevinSchedule(hot_steps=0, anneal_steps=0, cool_steps=0, denoise_sigma=denoise_sigma)
    (out,) = annealed_langevin(lambda x: (x**2).sum(-1), (x,), schedule, None)
    assert torch.equal(out, x)


def test_no_graph_and_no_grad_callers():
    """Under ``torch.no_grad()``, from a start that requires grad: detached results, parameters untouched."""
    model = GaussianLinear(3, 2)
    start = torch.randn(5, 3, requires_grad=True)
    with torch.no_grad():
        (v,) = annealed_langevin(lambda v: model(v, torch.zeros(5, 2)), (start,), plain(0.1, 3), None)
    assert not v.requires_grad and v.grad_fn is None
    assert model.A.grad is None


def test_progress_bar(capsys):
    annealed_langevin(lambda x: (x**2).sum(-1), (torch.zeros(2, 1),), plain(0.1, 3), None, progress=True)
    assert "annealed Langevin" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("mode", "model"),
    [("marginal", FreeGaussianLinear(5, 2)), ("joint", GaussianLinear(5, 2)), ("via_q", GaussianLinear(5, 2))],
)
def test_modes_default_schedule(mode, model):
    """Every mode runs the papers' full schedule (2700 steps and the denoising step) to finite ``(n, d)`` rows."""
    generator = torch.Generator().manual_seed(0)
    posterior, reference = ExactPosterior(model), torch.randn(3, 5)
    v = langevin_sample(model, mode, 7, LangevinSchedule(), generator, posterior=posterior, reference=reference)
    assert v.shape == (7, 5)
    assert torch.isfinite(v).all()


def test_marginal_samples_the_free_energy(float64):
    """``v`` on ``F(v) = ½vᵀPv``, ``P = (I + AAᵀ)⁻¹``: mean 0, the discretised covariance of precision P."""
    torch.manual_seed(0)
    model = FreeGaussianLinear(3, 2)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        v = langevin_sample(model, "marginal", 20000, plain(0.5, 400), generator)
        assert_moments(v, torch.zeros(3), discretised_covariance(model.precision(), 0.5))


def test_joint_samples_v_and_h_together(float64):
    """``(v, h)`` on ``E = ½‖v − Ah‖² + ½‖h‖²``, a Gaussian of precision ``J = [[I, −A], [−Aᵀ, I + AᵀA]]``:
    ``v``'s covariance is the top-left block of the discretised covariance of J (h moving is what makes it
    differ from the identity)."""
    torch.manual_seed(0)
    model = GaussianLinear(3, 2)
    eye_h = torch.eye(2)
    with torch.no_grad():
        joint_precision = torch.cat(
            [torch.cat([torch.eye(3), -model.A], 1), torch.cat([-model.A.T, eye_h + model.A.T @ model.A], 1)]
        )
    generator = torch.Generator().manual_seed(1)
    v = langevin_sample(model, "joint", 20000, plain(0.5, 400), generator)
    assert_moments(v, torch.zeros(3), discretised_covariance(joint_precision, 0.5)[:3, :3])


def test_via_q_holds_h_at_the_posterior_mean(float64):
    """``h`` fixed to ``E[h|v_ref] = v_refA(I + AᵀA)⁻¹``; ``p(v|h) = N(Ah, I)``, so chain ``i`` (which takes
    reference row ``i mod 2``) has mean ``A h_{i mod 2}`` and the discretised covariance of precision I."""
    torch.manual_seed(0)
    model = GaussianLinear(3, 2)
    reference = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 1.0]])
    generator = torch.Generator().manual_seed(1)
    v = langevin_sample(model, "via_q", 40000, plain(0.5, 250), generator, ExactPosterior(model), reference)
    with torch.no_grad():
        h = model.posterior_mean_and_cov(reference)[0]
        means = h @ model.A.T
    for row in range(2):
        assert_moments(v[row::2], means[row], discretised_covariance(torch.eye(3), 0.5))


@pytest.mark.parametrize(
    ("mode", "model", "kwargs", "key"),
    [
        ("gibbs", GaussianLinear(3, 2), {}, "mode"),
        ("marginal", GaussianLinear(3, 2), {}, "mode"),
        ("via_q", GaussianLinear(3, 2), {"posterior": "q"}, "reference"),
        ("via_q", GaussianLinear(3, 2), {"reference": torch.zeros(1, 3)}, "posterior"),
    ],
)
def test_mode_errors_name_the_key(mode, model, kwargs, key):
    with pytest.raises(ConfigError, match=f"^{key}=") as error:
        langevin_sample(model, mode, 4, plain(0.1, 1), None, **kwargs)
    assert error.value.key == key


def test_marginal_error_says_why():
    with pytest.raises(ConfigError, match="GaussianLinear has no free energy"):
        langevin_sample(GaussianLinear(3, 2), "marginal", 4, plain(0.1, 1), None)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("step_size", 0.0),
        ("hot_temperature", -1.0),
        ("hot_steps", -1),
        ("anneal_steps", 2.5),
        ("cool_steps", -3),
        ("denoise_sigma", -0.1),
        ("init_std", -1.0),
    ],
)
def test_schedule_validation(key, value):
    with pytest.raises(ConfigError, match=f"^{key}={value!r}") as error:
        LangevinSchedule(**{key: value})
    assert error.value.key == key


def test_update_matches_the_formula(float64):
    """A short annealed run is, step for step, ``x ← x − ½σ²∇_x E + √T·σ·ξ`` on both tensors (ξ for x, then
    for y, from the same generator) at ``T = 9, 9, 9, 9^(2/3), 9^(1/3), 1, ½, 0``, then ``x ← x − σ0²∇_x E``.

    ``E(x, y) = ½‖x‖² + ‖y‖² + Σ x⊙y``: ``∇_x E = x + y``, ``∇_y E = 2y + x``.
    """
    schedule = LangevinSchedule(
        step_size=0.3, hot_steps=2, hot_temperature=9.0, anneal_steps=3, cool_steps=3, denoise_sigma=0.2
    )
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    generator = torch.Generator().manual_seed(3)
    x_out, y_out = annealed_langevin(
        lambda x, y: 0.5 * (x**2).sum(-1) + (y**2).sum(-1) + (x * y).sum(-1), (x, y), schedule, generator
    )
    generator.manual_seed(3)
    for temperature in [9.0, 9.0, 9.0, 9 ** (2 / 3), 9 ** (1 / 3), 1.0, 0.5, 0.0]:
        noise_x, noise_y = (math.sqrt(temperature) * 0.3 * torch.randn(4, 3, generator=generator) for _ in range(2))
        x, y = x - 0.045 * (x + y) + noise_x, y - 0.045 * (2 * y + x) + noise_y
    x, y = x - 0.04 * (x + y), y - 0.04 * (2 * y + x)
    torch.testing.assert_close(x_out, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_out, y, rtol=1e-12, atol=1e-12)
