"""Deep EBLVMs on images: energy shapes, the posterior's Fisher loss, BiMDSM's alternating update, exact scores."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from eblvm.models import EBM, LatentEBM
from eblvm.objectives import ScoreMatching
from eblvm.objectives.estimators import BiSMScore, frozen_energy
from eblvm.posteriors import BoundPosterior, GaussianConvPosterior, GaussianPosterior
from eblvm.run import run
from tests.conftest import FAST_DEEP, ROOT, compose_train_config
from tests.models import GaussianLinear

IMAGE = (1, 8, 8)
D = math.prod(IMAGE)


def tiny_latent_ebm(h_dim: int = 3) -> LatentEBM:
    return LatentEBM(IMAGE, h_dim=h_dim, channels=4, depth="resnet6")


def test_latent_energy_is_nonnegative_with_batched_and_particle_batched_latents():
    torch.manual_seed(0)
    model, v = tiny_latent_ebm(), torch.rand(5, D)
    h_batch, h_particles = torch.randn(5, 3), torch.randn(7, 5, 3)
    assert model(v, h_batch).shape == (5,)
    per_particle = model(v, h_particles)
    assert per_particle.shape == (7, 5) and (per_particle >= 0).all()
    # a particle axis only repeats the batch computation
    torch.testing.assert_close(per_particle[3], model(v, h_particles[3]))
    torch.testing.assert_close(model(v.expand(7, 5, D), h_particles), per_particle)


def test_ebm_is_latent_free_with_an_exact_score(float64):
    torch.manual_seed(0)
    model, v = EBM(IMAGE, channels=4, depth="resnet9"), torch.rand(4, D)
    energy = model.free_energy(v)
    assert energy.shape == (4,) and (energy >= 0).all() and model.h_dim == 0
    score = model.score(v).detach()
    step = torch.zeros(D)
    step[10] = 1e-6
    with torch.no_grad():  # central difference of F along pixel 10, for every row
        slope = -(model.free_energy(v + step) - model.free_energy(v - step)) / 2e-6
    torch.testing.assert_close(score[:, 10], slope, rtol=1e-6, atol=1e-9)


def test_deep_model_sizes_follow_the_paper():
    mnist = LatentEBM((1, 32, 32), h_dim=50, channels=64, depth="resnet6")
    assert mnist.features_dim == 16 * 512 and mnist.head.out_features == 16 * 256
    cifar_ebm = EBM((3, 32, 32), channels=128, depth="resnet9")
    assert cifar_ebm.head.weight.numel() == 16 * 1024 * 16 * 512  # the 134M-parameter head of docs/methods.md §2.2


def test_posterior_fisher_loss_decreases_with_the_energy_fixed():
    torch.manual_seed(0)
    model, q = tiny_latent_ebm(), GaussianConvPosterior(IMAGE, h_dim=3, channels=(8, 8, 8))
    objective = ScoreMatching(higher="mdsm", estimator="bism", lower="fisher", sigma_begin=0.1, sigma_end=1.0)
    v, energy = torch.rand(32, D), frozen_energy(model)
    optimizer = torch.optim.Adam(q.parameters(), lr=1e-3)

    def loss_at(seed: int) -> float:
        return objective.lower_loss(energy, BoundPosterior(q), v, torch.Generator().manual_seed(seed)).item()

    before = sum(loss_at(seed) for seed in range(10)) / 10
    for step in range(150):
        loss = objective.lower_loss(energy, BoundPosterior(q), v, torch.Generator().manual_seed(100 + step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = sum(loss_at(seed) for seed in range(10)) / 10
    assert after < 0.5 * before
    assert all(p.grad is None for p in model.parameters()), "the energy is held fixed"


def test_bism_with_the_exact_gaussian_posterior_is_the_exact_score(float64):
    """``E(v,h) = ½‖v − Ah‖² + ½‖h‖²``: ``p(v) = N(0, I + AAᵀ)``, so ``∇ log p(v) = −(I + AAᵀ)⁻¹ v``."""
    torch.manual_seed(0)
    model = GaussianLinear(4, 3)

    class ExactPosterior(GaussianPosterior):
        def __init__(self):
            super().__init__(h_dim=3)

        def forward(self, v):
            mean, cov = model.posterior_mean_and_cov(v)
            log_std = 0.5 * torch.log(torch.diagonal(cov)).expand_as(mean)
            return mean, log_std

    # a diagonal Gaussian is exact only if the posterior covariance is diagonal: make AᵀA diagonal
    with torch.no_grad():
        model.A.copy_(torch.linalg.qr(torch.randn(4, 3))[0] * torch.tensor([0.5, 1.0, 2.0]))
    v = torch.randn(6, 4, requires_grad=True)
    score_fn = BiSMScore(n_particles=5).score_function(
        model, BoundPosterior(ExactPosterior()), torch.Generator().manual_seed(1)
    )
    score = score_fn(v)
    exact = -v @ torch.linalg.inv(torch.eye(4) + model.A @ model.A.T)
    torch.testing.assert_close(score, exact.expand(5, 6, 4), rtol=1e-10, atol=1e-10)


def test_bimdsm_without_unroll_is_the_alternating_update_written_out(tmp_path):
    """One training step of ``experiment=digits_bimdsm`` (SGD, K = 2, N = 0) against the same update by hand.

    By hand, with the run's generator (seed + rank 0) drawing in the same order: K times, noise levels
    ``σ_i = exp(linspace(log σ_begin, log σ_end, B))_i``, ``ṽ = v + σε``, ``h = μ(ṽ) + e^{log s(ṽ)}η`` and the
    posterior Fisher loss ``mean_i ½‖−∇_h E(ṽ_i,h_i) + (h_i − μ_i)/s_i²‖² / σ_i``, one SGD step of q; then
    ``ṽ = v + σε'``, ``h`` from the (now fixed) q at ``ṽ``, ``s(ṽ) = ∇_ṽ[−E(ṽ,h) − log q(h|ṽ)]`` and the energy's
    loss ``mean_i ½‖s(ṽ_i)/σ_i + ε'_i/σ0²‖²``, whose gradient must equal the run's energy step.
    """
    lr, posterior_lr = 1.0, 1e-3
    cfg = compose_train_config(
        tmp_path,
        FAST_DEEP
        + [
            "optim=sgd",
            f"optim.lr={lr}",
            f"optim.posterior_lr={posterior_lr}",
            "+callbacks.probe._target_=tests.ddp_probe.RankProbe",
            f"+callbacks.probe.out_dir={tmp_path / 'probe'}",
        ],
    )
    run(cfg)
    record = torch.load(tmp_path / "probe" / "rank0.pt", weights_only=False)
    v, start = record["first_batch"], record["initial_state"]
    model = tiny_latent_ebm()
    q = GaussianConvPosterior(IMAGE, h_dim=3, channels=(4, 4, 4))
    model.load_state_dict({k.removeprefix("model."): t for k, t in start.items() if k.startswith("model.")})
    q.load_state_dict({k.removeprefix("posterior."): t for k, t in start.items() if k.startswith("posterior.")})
    generator = torch.Generator().manual_seed(cfg.seed)
    objective = cfg.objective
    sigma = torch.exp(torch.linspace(math.log(objective.sigma_begin), math.log(objective.sigma_end), len(v)))[:, None]

    def noised() -> torch.Tensor:
        return v + sigma * torch.randn(v.shape, generator=generator)

    for _ in range(objective.n_lower_steps):
        v_noisy = noised()
        mean, log_std = q(v_noisy)
        h = (mean + log_std.exp() * torch.randn((1, *mean.shape), generator=generator)).squeeze(0)
        (energy_grad_h,) = torch.autograd.grad(model(v_noisy, h).sum(), h, create_graph=True)
        fisher = 0.5 * ((-energy_grad_h + (h - mean) / (2 * log_std).exp()) ** 2).sum(-1)
        grads = torch.autograd.grad((fisher / sigma[:, 0]).mean(), list(q.parameters()))
        with torch.no_grad():
            for p, g in zip(q.parameters(), grads, strict=True):
                p -= posterior_lr * g
    q.requires_grad_(False)
    eps = torch.randn(v.shape, generator=generator)
    v_noisy = (v + sigma * eps).requires_grad_(True)
    mean, log_std = q(v_noisy.detach())
    h = (mean + log_std.exp() * torch.randn((1, *mean.shape), generator=generator)).squeeze(0)
    mean_at_v, log_std_at_v = q(v_noisy)
    log_q = (-0.5 * ((h - mean_at_v) / log_std_at_v.exp()) ** 2 - log_std_at_v).sum(-1)
    (score,) = torch.autograd.grad((-model(v_noisy, h) - log_q).sum(), v_noisy, create_graph=True)
    loss = 0.5 * ((score / sigma + eps / objective.sigma0**2) ** 2).sum(-1).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    expected = torch.cat(
        [(p - lr * (0 if g is None else g)).detach().flatten() for p, g in zip(model.parameters(), grads, strict=True)]
    )
    trained = torch.cat([record["final_state"][f"model.{name}"].flatten() for name, _ in model.named_parameters()])
    torch.testing.assert_close(trained, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides", [[], ["ema_decay=0.9"]], ids=["raw", "ema"])
def test_digits_bimdsm_runs_and_writes_samples(tmp_path, overrides):
    steps = ["trainer.max_steps=4", "trainer.val_check_interval=2"]
    cfg = compose_train_config(tmp_path, FAST_DEEP + steps + overrides)
    summary = run(cfg)
    assert summary["steps"] == 4 and math.isfinite(summary["test/objective"])
    assert summary["sampling_mode"] == "via_q"
    assert summary["evaluated_weights"] == ("raw" if not overrides else "EMA (decay 0.9)")
    grids = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert grids == ["test_step0000004.png", "val_step0000002.png", "val_step0000004.png"]
    assert summary["figures"]["samples"].endswith("test_step0000004.png")


def test_digits_vagesmdsm_trains_with_refinement_and_ema_and_writes_samples(tmp_path):
    """The CPU-sized VaGES-MDSM file: VaGES with latent refinement, EMA weights evaluated, via-q samples."""
    overrides = ["experiment=digits_vagesmdsm", "debug=fast_deep", "trainer.max_steps=2"]
    cfg = compose_train_config(tmp_path, overrides)
    assert (cfg.objective.estimator, cfg.objective.refine_steps, cfg.ema_decay) == ("vages", 5, 0.99)
    summary = run(cfg)
    assert summary["steps"] == 2 and math.isfinite(summary["test/objective"])
    assert summary["evaluated_weights"] == "EMA (decay 0.99)" and summary["sampling_mode"] == "via_q"
    assert summary["figures"]["samples"].endswith("test_step0000002.png")


def test_fid_kid_and_linear_probe_through_a_training_run(tmp_path, random_inception_weights):
    """FID/KID of via-q samples at validation and test (a random-weight Inception stands in for the real file), and
    the linear probe on q's means: 10 digit classes, 270 test rows, so chance is 0.1 ± 0.018."""
    fid = ["evaluation.fid_samples=8", f"evaluation.inception_weights={random_inception_weights}"]
    summary = run(compose_train_config(tmp_path, FAST_DEEP + fid))
    assert summary["test/fid"] > 0 and math.isfinite(summary["test/kid_mean"]) and summary["test/kid_std"] >= 0
    assert "val/fid" in (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert summary["test/linear_probe_accuracy"] > 0.1 + 5 * 0.018


def test_sample_command_writes_a_grid_an_npz_and_pngs(tmp_path):
    run(compose_train_config(tmp_path, FAST_DEEP))
    command = [sys.executable, "-m", "eblvm.sample", str(tmp_path), "--n-samples", "5", "--png", "--schedule"]
    command += ["hot_steps=2", "anneal_steps=2", "cool_steps=2"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "samples" / "last"
    assert np.load(out / "samples.npz")["samples"].shape == (5, *IMAGE)
    assert (out / "grid.png").is_file() and len(list(out.glob("0000*.png"))) == 5
    assert "sampling (via_q)" in result.stderr


def test_sample_command_names_a_missing_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "eblvm.sample", str(tmp_path / "nowhere.ckpt")], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2 and f"no checkpoint at {tmp_path / 'nowhere.ckpt'}" in result.stderr
