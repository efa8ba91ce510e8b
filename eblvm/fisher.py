"""Fisher-divergence estimation: ``python -m eblvm.fisher <run dir or .ckpt> [--score exact|vaes]``.

The Fisher divergence between the data distribution ``p_d`` and a model's marginal ``p_θ`` is a maximum over
critics ``f`` (docs/methods.md §4.3):

    D_F = ½ E_pd ‖s_d(v) − s_θ(v)‖² = max_f E_pd[ f(v)ᵀ s_θ(v) + tr ∇_v f(v) − ½‖f(v)‖² ],

reached at ``f = s_θ − s_d``; only the model's score ``s_θ`` appears, and the data score drops out by integration
by parts. ``critic_values`` is the bracket per row with a Hutchinson trace (one Rademacher probe). ``s_θ`` is the
exact score ``−∇F`` (``score="exact"``, models with a free energy) or VaES through a posterior q trained beside the
critic by ``n_lower_steps`` ELBO steps per critic step with θ fixed (``score="vaes"``, any EBLVM with a q).
``estimate_fisher`` trains the critic on training rows and reports the objective's mean on test rows
with its standard error, for the final critic or, given validation rows, for the critic (and q) with the best
validation objective among those checked every ``eval_every`` steps: the bound is a maximum, and a critic that has
begun to fit the training rows' noise lowers it on unseen rows. ``experiments/fisher_estimation/`` runs the
VaGES paper's perturbed-GRBM benchmark, whose true divergence is exact.
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from eblvm import noise
from eblvm.assemble import rebuild
from eblvm.atomic import write_json
from eblvm.errors import ConfigError, require, require_choice, require_count
from eblvm.models.base import EnergyModel
from eblvm.models.grbm import GRBM
from eblvm.objectives.estimators import VaESScore, fit_posterior
from eblvm.objectives.lower import ELBO
from eblvm.posteriors.base import BoundPosterior, Posterior

SCORES = ("exact", "vaes")


class Critic(nn.Sequential):
    """``f``: three linear layers ``d → w → w → d`` (``w = width``, the VaGES paper's ``d`` by default) with ELU
    between them and none at the end. The last layer starts at zero, so training starts from ``f = 0``, whose bound
    is exactly 0 (the divergence's least value); a critic chosen on validation rows is then never worse than that
    there."""

    def __init__(self, dim: int, width: int | None = None):
        width = dim if width is None else width
        super().__init__(nn.Linear(dim, width), nn.ELU(), nn.Linear(width, width), nn.ELU(), nn.Linear(width, dim))
        nn.init.zeros_(self[-1].weight)
        nn.init.zeros_(self[-1].bias)


SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class FisherSettings:
    """The critic's training (the VaGES paper's: Adam 2e-4, betas (0.9, 0.999), 20k iterations of batch 100; a
    ``cosine`` schedule decays the rate to 0 over the steps) and, for VaES, q's: ``n_lower_steps`` ELBO steps per
    critic step with Adam ``posterior_lr`` and L = ``n_particles``. With validation rows, the critic is checked on
    them every ``eval_every`` steps."""

    steps: int = 20000
    batch_size: int = 100
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "constant"
    eval_every: int = 500
    critic_width: int | None = None
    n_lower_steps: int = 5
    posterior_lr: float = 1e-3
    n_particles: int = 1
    seed: int = 0

    def __post_init__(self):
        require_choice("schedule", self.schedule, SCHEDULES)
        if self.critic_width is not None:
            require_count("critic_width", self.critic_width, 1)
        for key in ("steps", "batch_size", "n_particles", "eval_every"):
            require_count(key, getattr(self, key), 1)
        require_count("n_lower_steps", self.n_lower_steps, 0)
        for key in ("lr", "posterior_lr"):
            require(getattr(self, key) > 0, key, getattr(self, key), "must be > 0")


@dataclass(frozen=True)
class FisherEstimate:
    """A mean over test rows and its standard error; for a critic, the step whose critic it was."""

    value: float
    stderr: float
    critic_step: int | None = None


def critic_values(critic: nn.Module, scores: torch.Tensor, v: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """Per row, ``f(v)ᵀs + uᵀ∇_v(uᵀf(v)) − ½‖f(v)‖²`` for the model's scores ``s`` (detached) and a probe ``u``."""
    v = v.detach().requires_grad_(True)
    f = critic(v)
    (directional,) = torch.autograd.grad((probe * f).sum(), v, create_graph=True)
    return (f * scores).sum(-1) + (probe * directional).sum(-1) - 0.5 * (f**2).sum(-1)


def _per_row_mean(values: torch.Tensor) -> FisherEstimate:
    return FisherEstimate(float(values.mean()), float(values.std() / math.sqrt(len(values))))


class _Scores:
    """The model's score at rows ``v``, detached: exact, or VaES through q (which ``step_posterior`` trains)."""

    def __init__(self, model: EnergyModel, score: str, posterior: Posterior | None, settings: FisherSettings):
        require_choice("--score", score, SCORES)
        if score == "exact":
            require(
                model.has_free_energy,
                "--score",
                score,
                f"{type(model).__name__} has no free energy, so no exact score: use --score vaes",
            )
        else:
            require(posterior is not None, "--score", score, "VaES needs a posterior q: give one, or use --score exact")
        self.model, self.score, self.posterior, self.settings = model, score, posterior, settings
        self.vaes = VaESScore(n_particles=settings.n_particles)
        if score == "vaes":
            self.optimizer = torch.optim.Adam(posterior.parameters(), lr=settings.posterior_lr, betas=(0.9, 0.95))

    def __call__(self, v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.score == "exact":
            return self.model.score(v.detach().requires_grad_(True)).detach()
        q = BoundPosterior.detached(self.posterior)
        return self.vaes.score_function(self.model, q, generator)(v.detach().requires_grad_(True)).detach()

    def posterior_state(self) -> dict | None:
        """A copy of q's weights (None for the exact score), to restore with ``load_posterior_state``."""
        return copy.deepcopy(self.posterior.state_dict()) if self.score == "vaes" else None

    def load_posterior_state(self, state: dict | None) -> None:
        if state is not None:
            self.posterior.load_state_dict(state)

    def step_posterior(self, v: torch.Tensor, generator: torch.Generator) -> None:
        """``n_lower_steps`` ELBO steps of q on rows ``v`` with the model held fixed."""
        if self.score == "vaes":
            fit_posterior(ELBO(), self.model, self.posterior, self.optimizer, v, generator, self.settings.n_lower_steps)


def estimate_fisher(
    model: EnergyModel,
    train: torch.Tensor,
    test: torch.Tensor,
    score: str = "exact",
    posterior: Posterior | None = None,
    settings: FisherSettings = FisherSettings(),
    progress: bool = True,
    val: torch.Tensor | None = None,
    data_score: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> FisherEstimate:
    """Train a critic on ``train`` rows to maximise the variational bound of ``D_F`` (and, for ``score="vaes"``, q
    beside it, in place), then report the bound's mean over ``test`` rows with its standard error: for the final
    critic, or with ``val`` rows for the critic (and q) whose validation objective was highest. The model's
    parameters are not changed.

    ``data_score`` is a diagnostic for benchmarks whose data score ``s_d`` is known (exact score only): the critic
    is then fitted by regression onto the optimal critic, minimising ``½‖f(v) − (s_θ(v) − s_d(v))‖²``, instead of
    through the bound, and is checked and reported through the bound as before. Both objectives have the same
    expectation up to a constant; regression is without the noise of the trace estimate, so comparing the two
    estimates separates the critic's fit from that noise."""
    for rows in (train, test) if val is None else (train, val, test):
        same_width = rows.dim() == train.dim() == 2 and rows.shape[-1] == train.shape[-1]
        require(same_width, "data", tuple(rows.shape), f"rows (n, d) with the training rows' d = {train.shape[-1]}")
    if data_score is not None:
        # with VaES the target would carry q's error and VaES's noise, not the optimal critic
        require(score == "exact", "--fit", "regression", f"needs the exact score, not {score!r}")
        probe_rows = train[:2]
        returned = tuple(data_score(probe_rows).shape)
        require(
            returned == probe_rows.shape,
            "data_score",
            returned,
            f"must return one score per row, of the rows' shape {tuple(probe_rows.shape)}",
        )
    scores = _Scores(model, score, posterior, settings)
    # training, validation and test each draw from their own stream, so checking leaves the training path unchanged
    generator, val_generator, test_generator = (
        torch.Generator(device=train.device).manual_seed(settings.seed + offset) for offset in range(3)
    )
    critic = Critic(train.shape[1], settings.critic_width).to(train.device, train.dtype)
    optimizer = torch.optim.Adam(critic.parameters(), lr=settings.lr, betas=settings.betas)
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps) if settings.schedule == "cosine" else None
    )
    best = None  # (validation objective, step, critic state, q state), from step 0 (f = 0) on

    def check(step: int) -> None:
        nonlocal best
        checked = _evaluate(critic, scores, val, settings.batch_size, val_generator).value
        if best is None or checked > best[0]:
            best = (checked, step, copy.deepcopy(critic.state_dict()), scores.posterior_state())
        bar.set_postfix(val=f"{checked:.4g}", best_step=best[1])

    order, position = torch.randperm(len(train), generator=generator, device=train.device), 0
    bar = tqdm(range(1, settings.steps + 1), desc=f"critic ({score} score)", disable=not progress, mininterval=2)
    if val is not None:
        check(0)
    for step in bar:
        if position + settings.batch_size > len(train):
            order, position = torch.randperm(len(train), generator=generator, device=train.device), 0
        v = train[order[position : position + settings.batch_size]]
        position += settings.batch_size
        scores.step_posterior(v, generator)
        if data_score is None:
            objective = _bound(critic, scores, v, generator).mean()
        else:
            optimal = scores(v, generator) - data_score(v)
            objective = -0.5 * ((critic(v) - optimal) ** 2).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        (-objective).backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        if val is not None and (step % settings.eval_every == 0 or step == settings.steps):
            check(step)
    step = settings.steps
    if best is not None:
        _, step, critic_state, posterior_state = best
        critic.load_state_dict(critic_state)
        scores.load_posterior_state(posterior_state)
    return replace(_evaluate(critic, scores, test, settings.batch_size, test_generator), critic_step=step)


def _evaluate(
    critic: nn.Module, scores: _Scores, rows: torch.Tensor, batch_size: int, generator: torch.Generator
) -> FisherEstimate:
    """The critic's objective over ``rows``: its mean and standard error."""
    values = []
    for start in range(0, len(rows), batch_size):
        v = rows[start : start + batch_size]
        values.append(_bound(critic, scores, v, generator).detach())
    return _per_row_mean(torch.cat(values))


def _bound(critic: nn.Module, scores: _Scores, v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``critic_values`` at rows ``v`` with the model's scores there and a fresh Rademacher probe."""
    return critic_values(critic, scores(v, generator), v, noise.signs(v.shape, generator, v))


@dataclass(frozen=True)
class BenchmarkCase:
    """One case of the perturbed-GRBM benchmark: N(0, I_d) rows split 80/10/10 and the GRBM at one level."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    model: GRBM


def benchmark_case(dim: int, level: float, n_rows: int = 20000, seed: int = 0) -> BenchmarkCase:
    """The benchmark's data and model (docs/methods.md §4.3): ``n_rows`` draws of N(0, I_dim) (the VaGES paper's
    20,000, split 16k/2k/2k), then ``perturbed_grbm`` from the same generator, its parameters frozen."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(n_rows, dim, generator=generator)
    n_train, n_val = int(0.8 * n_rows), int(0.1 * n_rows)
    model = perturbed_grbm(dim, level, generator)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return BenchmarkCase(data[:n_train], data[n_train : n_train + n_val], data[n_train + n_val :], model)


def perturbed_grbm(dim: int, level: float, generator: torch.Generator) -> GRBM:
    """The benchmark's GRBM (docs/methods.md §4.3): ``v_dim = h_dim = dim``, σ fixed at 1 and ``W = b = c = 0`` (its
    marginal is then N(0, I), the data), plus ``level · N(0, 1)`` on every entry of W, b and c."""
    model = GRBM(dim, dim, learn_sigma=False)
    with torch.no_grad():
        for parameter in (model.W, model.b, model.c):
            parameter.copy_(level * torch.randn(parameter.shape, generator=generator))
    return model


def true_fisher_to_standard_normal(model: EnergyModel, test: torch.Tensor) -> FisherEstimate:
    """``½ mean_test ‖−v − s_θ(v)‖²``: the Fisher divergence from data N(0, I) (score ``−v``) on ``test`` rows."""
    score = model.score(test.detach().requires_grad_(True)).detach()
    return _per_row_mean(0.5 * ((-test - score) ** 2).sum(-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a run directory (its checkpoints/last.ckpt) or a .ckpt file")
    parser.add_argument("--score", choices=SCORES, default="exact")
    parser.add_argument("--steps", type=int, default=FisherSettings.steps)
    parser.add_argument("--seed", type=int, default=FisherSettings.seed)
    parser.add_argument("--out", type=Path, help="where fisher_<score>.json goes (default: <run>/evaluation)")
    args = parser.parse_args()
    try:
        trained = rebuild(args.checkpoint)
        if args.score == "vaes" and trained.posterior is None:
            message = f"the run at {args.checkpoint} trained no posterior: use --score exact"
            raise ConfigError("--score", "vaes", message)
        settings = FisherSettings(steps=args.steps, seed=args.seed)
        splits = trained.datamodule.splits
        for parameter in trained.model.parameters():
            parameter.requires_grad_(False)
        estimate = estimate_fisher(
            trained.model, splits.train, splits.test, args.score, trained.posterior, settings, val=splits.val
        )
    except (ConfigError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    print(
        f"Fisher divergence ({args.score} score): {estimate.value:.4f} ± {estimate.stderr:.4f} (test, ± 1 s.e.; "
        f"the critic of step {estimate.critic_step}, best on the validation split)"
    )
    out = args.out or trained.path.parent.parent / "evaluation"
    record = {**asdict(estimate), "score": args.score, "checkpoint": str(trained.path), "settings": asdict(settings)}
    write_json(out / f"fisher_{args.score}.json", record)
    print(f"wrote {out / f'fisher_{args.score}.json'}")


if __name__ == "__main__":
    main()
