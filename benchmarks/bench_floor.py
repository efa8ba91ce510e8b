"""The eager floor of the default iteration: the same BiDSM K5 N5 step written out by hand in plain torch.

    python benchmarks/bench_floor.py              # about a minute on 2 CPU cores
    python benchmarks/bench_floor.py --steps 300

The default run's iteration (GRBM 2->4, linear relaxed-Bernoulli q at temperature 0.1, ELBO lower loss, K = 5 real
Adam steps of q, an N = 5 step differentiable Adam unroll, DSM sigma 0.05 with BiSM's score, one Adam step of the
energy, batch 100) hand-written with no abstraction: tensors in lists, one function per loss, in-place tensor-list
Adam for the real steps, the differentiable one (eblvm's folded form) for the unroll. It does the work eblvm's step
does, the losses' and gradients' finiteness check included, but none of its generality (objectives, estimators,
posteriors, ensembles, schedules, one decision across ranks).

Printed, each the median ms per iteration after a warm-up, all in one process one after the other:

- ``hand-written, bare``: the hand-written iteration in a Python loop: what eager PyTorch costs for this step;
- ``hand-written in Lightning``: the same as a manual-optimization LightningModule's training_step, trained by
  ``Trainer.fit`` with no evaluation (the energy's step through Lightning's optimizer, so that steps are counted):
  what a Lightning run of this step costs at least;
- ``eblvm``: eblvm's ``BilevelModule`` with the same parts, trained the same way.

Divide 68be223's training time per step (``bench_default_run.py``) by three to compare a target with these floors.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.bench_iteration import bench_module  # noqa: E402
from benchmarks.timing import BatchTimer, quiet_trainer  # noqa: E402

V_DIM, H_DIM, BATCH, K, N = 2, 4, 100, 5, 5
SIGMA, TEMPERATURE, LR, BETAS, EPS, SQRT_STABILISER = 0.05, 0.1, 1e-3, (0.9, 0.95), 1e-8, 1e-16


def grbm_energy(theta, v, h):
    """``½ Σ (v − b)²/σ² − hᵀ(c + Wᵀv)``."""
    weight, bias, hidden_bias, log_sigma = theta
    return 0.5 * ((v - bias) ** 2 / torch.exp(2 * log_sigma)).sum(-1) - (h * (hidden_bias + v @ weight)).sum(-1)


def relaxed_sample(phi, v, generator):
    """q's logits at ``v`` and a relaxed draw ``h = sigmoid((l + logistic)/τ)``."""
    logits = v @ phi[0].mT + phi[1]
    u = torch.rand(logits.shape, generator=generator).clamp_(torch.finfo(logits.dtype).tiny, 1 - 1e-7)
    return logits, torch.sigmoid((logits + torch.logit(u)) / TEMPERATURE)


def log_q(logits, h):
    return (h * logits - F.softplus(logits)).sum(-1)


def elbo_loss(theta, phi, v, generator):
    """The negative ELBO ``mean[E(v, h) + log q(h|v)]`` at freshly perturbed ``v``."""
    v = v + SIGMA * torch.randn(v.shape, generator=generator)
    logits, h = relaxed_sample(phi, v, generator)
    return (grbm_energy(theta, v, h) + log_q(logits, h)).mean()


def adam_in_place(params, grads, moments, step):
    """torch.optim.Adam's step in place, in its fewest tensor-list operations."""
    exp_avg, exp_avg_sq = moments
    torch._foreach_lerp_(exp_avg, grads, 1 - BETAS[0])
    torch._foreach_mul_(exp_avg_sq, BETAS[1])
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - BETAS[1])
    denom = torch._foreach_div(exp_avg_sq, 1 - BETAS[1] ** step)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, EPS)
    torch._foreach_addcdiv_(params, exp_avg, denom, -LR / (1 - BETAS[0] ** step))


def adam_differentiable(params, grads, moments, step):
    """The unroll's Adam step (with the square root's stabiliser), in the folded form of eblvm's rule:
    ``φ − c₁·m / (√(v + δc₂) + eps·√c₂)`` with ``c₂ = 1 − β₂ᵗ`` and ``c₁ = lr·√c₂/(1 − β₁ᵗ)``."""
    c2 = 1 - BETAS[1] ** step
    exp_avg = torch._foreach_lerp(moments[0], grads, 1 - BETAS[0])
    exp_avg_sq = torch._foreach_addcmul(torch._foreach_mul(moments[1], BETAS[1]), grads, grads, 1 - BETAS[1])
    denom = torch._foreach_add(torch._foreach_sqrt(torch._foreach_add(exp_avg_sq, SQRT_STABILISER * c2)), EPS * c2**0.5)
    update = torch._foreach_div(exp_avg, denom)
    return torch._foreach_add(params, update, alpha=-LR * c2**0.5 / (1 - BETAS[0] ** step)), [exp_avg, exp_avg_sq]


class HandWritten:
    """The parameters, optimizer states and noise of the hand-written iteration."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        bound = H_DIM**-0.5
        self.theta = [
            torch.nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))
            for shape in ((V_DIM, H_DIM), (V_DIM,), (H_DIM,))
        ] + [torch.nn.Parameter(torch.zeros(V_DIM))]
        self.phi = [torch.nn.Parameter(torch.randn(H_DIM, V_DIM) * 0.5), torch.nn.Parameter(torch.zeros(H_DIM))]
        self.phi_moments = [[torch.zeros_like(p) for p in self.phi] for _ in range(2)]
        self.theta_moments = [[torch.zeros_like(p) for p in self.theta] for _ in range(2)]
        self.generator = torch.Generator().manual_seed(seed)
        self.lower_steps = 0
        self.energy_steps = 0

    def lower_level(self, v):
        """K real Adam steps of q with the energy detached; the losses and gradient norms for a finiteness check."""
        frozen = [p.detach() for p in self.theta]
        checks = []
        for _ in range(K):
            loss = elbo_loss(frozen, self.phi, v, self.generator)
            for p in self.phi:
                p.grad = None
            loss.backward()
            grads = [p.grad for p in self.phi]
            checks += [loss.detach(), torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))]
            self.lower_steps += 1
            with torch.no_grad():
                adam_in_place(self.phi, grads, self.phi_moments, self.lower_steps)
        return checks

    def unroll(self, v):
        """N differentiable Adam steps from detached copies of q's weights and moments: ``φ_N(θ)``."""
        phi = [p.detach().requires_grad_(True) for p in self.phi]
        moments = [[m.clone() for m in level] for level in self.phi_moments]
        for n in range(N):
            grads = torch.autograd.grad(elbo_loss(self.theta, phi, v, self.generator), phi, create_graph=True)
            phi, moments = adam_differentiable(phi, list(grads), moments, self.lower_steps + n + 1)
        return phi

    def higher_loss(self, v, phi):
        """DSM ``½‖s(ṽ) + ε/σ‖²`` with BiSM's score ``∇_ṽ[−E(ṽ, h) − log q(h|ṽ)]``, ``h`` drawn at detached ``ṽ``."""
        eps = torch.randn(v.shape, generator=self.generator)
        noisy = (v + SIGMA * eps).requires_grad_(True)
        _, h = relaxed_sample(phi, noisy.detach(), self.generator)
        log_joint = -grbm_energy(self.theta, noisy, h) - log_q(noisy @ phi[0].mT + phi[1], h)
        (score,) = torch.autograd.grad(log_joint.sum(), noisy, create_graph=True)
        return (0.5 * ((score + eps / SIGMA) ** 2).sum(-1)).mean()

    def energy_gradient(self, v):
        """Everything up to the energy's gradient; whether every checked value is finite."""
        checks = self.lower_level(v)
        loss = self.higher_loss(v, self.unroll(v))
        for p in self.theta:
            p.grad = None
        loss.backward()
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in self.theta])))
        return bool(torch.isfinite(torch.stack([*checks, loss.detach(), norm])).all())

    def energy_step(self):
        self.energy_steps += 1
        with torch.no_grad():
            adam_in_place(self.theta, [p.grad for p in self.theta], self.theta_moments, self.energy_steps)


class HandWrittenModule(pl.LightningModule):
    """The hand-written iteration as a manual-optimization LightningModule; the energy steps through Lightning's
    optimizer (so that Lightning counts the step), with the hand-written in-place Adam as its rule."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.step_ = HandWritten()
        self.theta = torch.nn.ParameterList(self.step_.theta)
        self.phi = torch.nn.ParameterList(self.step_.phi)

    def configure_optimizers(self):
        return _RuleOptimizer(self.theta, self.step_)

    def training_step(self, v, batch_idx):
        if self.step_.energy_gradient(v):
            self.optimizers().step()


class _RuleOptimizer(torch.optim.Optimizer):
    def __init__(self, params, iteration: HandWritten):
        super().__init__(params, {"lr": LR})
        self.iteration = iteration

    def step(self, closure=None):
        if closure is not None:  # Lightning's closure runs its before-optimizer-step hooks, as eblvm's step does
            closure()
        self.iteration.energy_step()


def median_ms(durations: list[float], warmup: int) -> float:
    return 1000 * statistics.median(durations[warmup:])


def bare(steps: int, warmup: int) -> float:
    iteration, data = HandWritten(), torch.rand(BATCH * (steps + warmup), V_DIM)
    durations = []
    for batch in data.split(BATCH):
        started = time.perf_counter()
        if iteration.energy_gradient(batch):
            iteration.energy_step()
        durations.append(time.perf_counter() - started)
    return median_ms(durations, warmup)


def in_lightning(module: pl.LightningModule, steps: int, warmup: int) -> float:
    data = torch.rand(BATCH * (steps + warmup), V_DIM)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True, drop_last=True)
    timer = BatchTimer("cpu")
    quiet_trainer("cpu", steps + warmup, [timer], devices=1).fit(module, loader)
    return median_ms(timer.durations, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="timed iterations per measurement")
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args()
    rows = {
        "hand-written, bare": bare(args.steps, args.warmup),
        "hand-written in Lightning": in_lightning(HandWrittenModule(), args.steps, args.warmup),
        "eblvm": in_lightning(bench_module("toy", "bism", N), args.steps, args.warmup),
    }
    print(f"default iteration (GRBM 2->4, BiDSM K{K} N{N}, batch {BATCH}), ms per iteration, median of {args.steps}")
    for label, ms in rows.items():
        print(f"{label:<28} {ms:8.2f}")


if __name__ == "__main__":
    main()
