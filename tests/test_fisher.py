"""Fisher-divergence estimation (docs/methods.md §4.3): the critic's bound, the benchmark's exact values, the
estimator on a small perturbed GRBM, and the command on a trained run."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from eblvm import fisher, noise
from eblvm.errors import ConfigError
from eblvm.fisher import (
    Critic,
    FisherSettings,
    benchmark_case,
    critic_values,
    estimate_fisher,
    perturbed_grbm,
    true_fisher_to_standard_normal,
)
from eblvm.models.deep import LatentEBM
from eblvm.posteriors import RelaxedBernoulliPosterior
from eblvm.run import run
from tests.conftest import FAST_RUN, compose_train_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_critic_values_are_the_bound_with_a_hutchinson_trace(float64):
    """For a linear critic f(v) = Av + c the trace term is uᵀAu, the bound fᵀs + uᵀAu − ½‖f‖²."""
    critic = nn.Linear(3, 3)
    v, scores, probe = torch.randn(4, 3), torch.randn(4, 3), torch.randint(0, 2, (4, 3)).double() * 2 - 1
    f = critic(v)
    expected = (f * scores).sum(-1) + ((probe @ critic.weight.T) * probe).sum(-1) - 0.5 * (f**2).sum(-1)
    torch.testing.assert_close(critic_values(critic, scores, v, probe), expected)


def test_the_unperturbed_grbm_is_the_data_distribution():
    model = perturbed_grbm(6, 0.0, torch.Generator().manual_seed(0))
    test = torch.randn(50, 6)
    torch.testing.assert_close(model.score(test), -test)
    assert true_fisher_to_standard_normal(model, test).value == 0
    assert true_fisher_to_standard_normal(perturbed_grbm(6, 0.5, torch.Generator().manual_seed(0)), test).value > 0


@pytest.mark.parametrize("level", [0.2, 0.4, 1.0])
def test_the_optimal_critic_reaches_the_exact_divergence_on_the_benchmarks_test_rows(level):
    """The benchmark's data and GRBM (d = 200, seed 0): with the optimal critic f* = s_θ − s_d = s_θ + v, the bound's
    mean over the 2000 test rows (Hutchinson trace, one probe per row) is the exact divergence within 2 standard
    errors of the difference; so any gap of a trained critic is the critic's, not the bound's evaluation."""
    case = benchmark_case(200, level)
    model, test = case.model, case.test
    assert test.shape == (2000, 200)
    scores = model.score(test).detach()
    probe = noise.signs(test.shape, torch.Generator().manual_seed(5), test)
    bound = critic_values(lambda v: model.score(v) + v, scores, test, probe).detach()
    truth = 0.5 * ((-test - scores) ** 2).sum(-1)
    difference = bound - truth
    assert difference.mean().abs() <= 2 * difference.std() / len(difference) ** 0.5, (bound.mean(), truth.mean())


@pytest.mark.parametrize("score", ["exact", "vaes"])
def test_the_estimate_recovers_the_exact_divergence_at_two_levels(score):
    """d = 10, 2000 critic steps at lr 1e-3 with a cosine decay (VaES: 2 ELBO steps each), the critic chosen on
    validation rows: within 2 standard errors + 5 % of the truth at p = 0 and p = 0.3."""
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(4000, 10, generator=generator)
    train, val, test = data[:3200], data[3200:3600], data[3600:]
    for level in (0.0, 0.3):
        model = perturbed_grbm(10, level, torch.Generator().manual_seed(1))
        torch.manual_seed(0)
        posterior = RelaxedBernoulliPosterior(10, 10, temperature=0.1) if score == "vaes" else None
        settings = FisherSettings(steps=2000, lr=1e-3, schedule="cosine", n_lower_steps=2, seed=1)
        estimate = estimate_fisher(model, train, test, score, posterior, settings, progress=False, val=val)
        truth = true_fisher_to_standard_normal(model, test)
        assert abs(estimate.value - truth.value) <= 2 * estimate.stderr + 0.05 * truth.value, (level, estimate, truth)
        if level > 0:
            assert estimate.value > 10 * estimate.stderr, "the divergence is told apart from zero"
            assert estimate.critic_step > 0


def test_the_regression_diagnostic_fits_the_optimal_critic_when_the_critic_can_represent_it(monkeypatch):
    """With W = 0 the optimal critic s_θ − s_d = s_θ + v is the constant b: fitted by regression onto it (the data
    score −v given), the critic outputs b, and its bound on test rows is the exact divergence ½‖b‖²."""
    model = perturbed_grbm(4, 0.0, torch.Generator())
    b = torch.tensor([1.0, -0.5, 0.25, 2.0])
    with torch.no_grad():
        model.b.copy_(b)
    data = torch.randn(3000, 4, generator=torch.Generator().manual_seed(0))
    train, val, test = data[:2000], data[2000:2500], data[2500:]
    critics = []
    torch.manual_seed(0)
    monkeypatch.setattr(fisher, "Critic", lambda *args: critics.append(Critic(*args)) or critics[-1])
    settings = FisherSettings(steps=1500, lr=1e-2, schedule="cosine", eval_every=100)
    estimate = estimate_fisher(model, train, test, settings=settings, progress=False, val=val, data_score=lambda v: -v)
    (critic,) = critics
    with torch.no_grad():
        root_mean_square_error = (critic(test) - b).pow(2).mean().sqrt()
    assert root_mean_square_error < 0.01, root_mean_square_error
    truth = true_fisher_to_standard_normal(model, test)
    torch.testing.assert_close(truth.value, 0.5 * float((b**2).sum()), rtol=1e-5, atol=0)
    assert abs(estimate.value - truth.value) <= 2 * estimate.stderr, (estimate, truth)


def test_validation_rows_choose_a_critic_that_has_not_fitted_the_training_rows():
    """At p = 0 (model = data) on 200 training rows, the final critic has fitted their noise and its test bound is
    well below the true 0; chosen on validation rows from step 0 on (the critic starts at f = 0, bound exactly 0),
    from the same training run, the estimate is not."""
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(2200, 10, generator=generator)
    train, val, test = data[:200], data[200:1200], data[1200:]
    model = perturbed_grbm(10, 0.0, generator)
    settings = FisherSettings(steps=800, lr=1e-3, seed=1, eval_every=100)
    final = estimate_fisher(model, train, test, "exact", None, settings, progress=False)
    chosen = estimate_fisher(model, train, test, "exact", None, settings, progress=False, val=val)
    assert final.critic_step == 800 and final.value < -3 * final.stderr < 0, final
    assert abs(chosen.value) <= 2 * chosen.stderr, chosen
    assert Critic(10)(torch.randn(3, 10)).abs().max() == 0, "a fresh critic is f = 0"


def test_the_chosen_critic_and_q_are_those_of_a_run_stopped_at_their_step():
    """VaES on 200 training rows at p = 0.3: the validation rows choose an intermediate step, and the estimate and
    q's weights equal those of the same training stopped at that step (checking draws from its own stream)."""
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(1400, 10, generator=generator)
    train, val, test = data[:200], data[200:800], data[800:]
    model = perturbed_grbm(10, 0.3, torch.Generator().manual_seed(1))

    def fit(steps, val):
        torch.manual_seed(0)
        posterior = RelaxedBernoulliPosterior(10, 10, temperature=0.1)
        settings = FisherSettings(steps=steps, lr=1e-3, n_lower_steps=1, seed=1, eval_every=100)
        return estimate_fisher(model, train, test, "vaes", posterior, settings, progress=False, val=val), posterior

    chosen, chosen_q = fit(1000, val)
    assert 0 < chosen.critic_step < 1000, chosen
    stopped, stopped_q = fit(chosen.critic_step, None)
    assert (stopped.value, stopped.stderr) == (chosen.value, chosen.stderr)
    for name, weight in chosen_q.state_dict().items():
        assert torch.equal(weight, stopped_q.state_dict()[name]), name


def test_bad_pairings_are_refused_with_the_key():
    data = torch.randn(10, 64)
    with pytest.raises(ConfigError, match="--score='exact'.*no free energy"):
        estimate_fisher(LatentEBM(image_shape=(1, 8, 8), h_dim=2, channels=2), data, data, "exact")
    with pytest.raises(ConfigError, match="--score='vaes'.*needs a posterior"):
        estimate_fisher(perturbed_grbm(2, 0.1, torch.Generator()), data[:, :2], data[:, :2], "vaes")
    with pytest.raises(ConfigError, match="steps=0"):
        FisherSettings(steps=0)
    with pytest.raises(ConfigError, match="critic_width=0: must be an integer >= 1"):
        FisherSettings(critic_width=0)
    with pytest.raises(ConfigError, match=r"data=\(10, 3\).*d = 2"):
        estimate_fisher(perturbed_grbm(2, 0.1, torch.Generator()), data[:, :2], data[:, :2], val=data[:, :3])
    grbm, rows = perturbed_grbm(2, 0.1, torch.Generator()), data[:, :2]
    q = RelaxedBernoulliPosterior(2, 2, temperature=0.1)
    with pytest.raises(ConfigError, match="--fit='regression'.*needs the exact score, not 'vaes'"):
        estimate_fisher(grbm, rows, rows, "vaes", q, data_score=lambda v: -v)
    with pytest.raises(ConfigError, match=r"data_score=\(2,\).*one score per row"):
        estimate_fisher(grbm, rows, rows, data_score=lambda v: -v.sum(-1))


def test_the_command_estimates_a_trained_runs_divergence(tmp_path, monkeypatch, capsys):
    run(compose_train_config(tmp_path, FAST_RUN))
    monkeypatch.setattr(sys, "argv", ["eblvm.fisher", str(tmp_path), "--score", "vaes", "--steps", "20"])
    fisher.main()
    assert "Fisher divergence (vaes score)" in capsys.readouterr().out
    record = json.loads((tmp_path / "evaluation" / "fisher_vaes.json").read_text())
    assert record["settings"]["steps"] == 20 and record["stderr"] > 0
    dsm = tmp_path / "dsm"
    run(compose_train_config(dsm, FAST_RUN + ["objective=dsm"]))
    monkeypatch.setattr(sys, "argv", ["eblvm.fisher", str(dsm), "--score", "vaes"])
    with pytest.raises(SystemExit) as stopped:
        fisher.main()
    assert stopped.value.code == 2 and "--score='vaes': the run at" in capsys.readouterr().err
