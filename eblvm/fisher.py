"""Fisher-divergence estimation: ``python -m eblvm.fisher <run dir or .ckpt> [--score exact|vaes]``.

The Fisher divergence between the data distribution ``p_d`` and a model's marginal ``p_θ`` is a maximum over
critics ``f`` (docs/methods.md §4.3):

    D_F = ½ E_pd ‖s_d(v) − s_θ(v)‖² = max_f E_pd[ f(v)ᵀ s_θ(v) + tr ∇_v f(v) − ½‖f(v)‖² ],

reached at ``f = s_θ − s_d``; only the model's score ``s_θ`` appears, and the data score drops out by integration
by parts. ``critic_values`` is the bracket per row with a Hutchinson trace (one Rademacher probe). ``s_θ`` is the
exact score ``−∇F`` (``score="exact"``, models with a free energy) or VaES through a posterior q trained beside the
critic by ``n_lower_steps`` ELBO steps per critic step with θ fixed (``score="vaes"``, any EBLVM with a q).
``estimate_fisher`` trains the critic on training rows and reports the objective's mean on test rows
with its standard error. ``experiments/fisher_estimation/`` runs the VaGES paper's perturbed-GRBM benchmark,
whose true divergence is exact.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from eblvm import noise
from eblvm.assemble import rebuild
from eblvm.errors import ConfigError, require, require_choice
from eblvm.models.base import EnergyModel
from eblvm.models.grbm import GRBM
from eblvm.objectives.estimators import VaESScore, frozen_energy
from eblvm.objectives.lower import ELBO
from eblvm.posteriors.base import BoundPosterior, Posterior

SCORES = ("exact", "vaes")


class Critic(nn.Sequential):
    """``f``: three ``Linear(d, d)`` layers with ELU between them and none at the end."""

    def __init__(self, dim: int):
        super().__init__(nn.Linear(dim, dim), nn.ELU(), nn.Linear(dim, dim), nn.ELU(), nn.Linear(dim, dim))


@dataclass(frozen=True)
class FisherSettings:
    """The critic's training (the VaGES paper's: Adam 2e-4, betas (0.9, 0.999), 20k iterations of batch 100) and,
    for VaES, q's: ``n_lower_steps`` ELBO steps per critic step with Adam ``posterior_lr`` and L = ``n_particles``."""

    steps: int = 20000
    batch_size: int = 100
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    n_lower_steps: int = 5
    posterior_lr: float = 1e-3
    n_particles: int = 1
    seed: int = 0

    def __post_init__(self):
        for key in ("steps", "batch_size", "n_particles"):
            value = getattr(self, key)
            require(isinstance(value, int) and value >= 1, key, value, "must be an integer >= 1")
        steps = self.n_lower_steps
        require(isinstance(steps, int) and steps >= 0, "n_lower_steps", steps, "must be an integer >= 0")
        for key in ("lr", "posterior_lr"):
            require(getattr(self, key) > 0, key, getattr(self, key), "must be > 0")


@dataclass(frozen=True)
class FisherEstimate:
    """The test objective of the final critic: its mean over test rows and that mean's standard error."""

    value: float
    stderr: float


def critic_values(critic: nn.Module, scores: torch.Tensor, v: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """Per row, ``f(v)ᵀs + uᵀ∇_v(uᵀf(v)) − ½‖f(v)‖²`` for the model's scores ``s`` (detached) and a probe ``u``."""
    v = v.detach().requires_grad_(True)
    f = critic(v)
    (directional,) = torch.autograd.grad((probe * f).sum(), v, create_graph=True)
    return (f * scores).sum(-1) + (probe * directional).sum(-1) - 0.5 * (f**2).sum(-1)


def _per_row_mean(values: torch.Tensor) -> FisherEstimate:
    return FisherEstimate(float(values.mean()), float(values.std() / math.sqrt(len(values))))


class _Scores:
    """The model's score at rows ``v``, detached: exact, or VaES through q (which ``fit_posterior`` trains)."""

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

    def fit_posterior(self, v: torch.Tensor, generator: torch.Generator) -> None:
        """``n_lower_steps`` ELBO steps of q on rows ``v`` with the model held fixed."""
        if self.score != "vaes":
            return
        energy, q, elbo = frozen_energy(self.model), BoundPosterior(self.posterior), ELBO()
        for _ in range(self.settings.n_lower_steps):
            self.optimizer.zero_grad(set_to_none=True)
            elbo(energy, q, v, generator).mean().backward()
            self.optimizer.step()


def estimate_fisher(
    model: EnergyModel,
    train: torch.Tensor,
    test: torch.Tensor,
    score: str = "exact",
    posterior: Posterior | None = None,
    settings: FisherSettings = FisherSettings(),
    progress: bool = True,
) -> FisherEstimate:
    """Train a critic on ``train`` rows to maximise the variational bound of ``D_F`` (and, for ``score="vaes"``, q
    beside it, in place), then report the bound's mean over ``test`` rows with its standard error. The model's
    parameters are not changed."""
    require(train.dim() == 2 and test.dim() == 2, "data", tuple(train.shape), "rows (n, d) are needed")
    scores = _Scores(model, score, posterior, settings)
    generator = torch.Generator(device=train.device).manual_seed(settings.seed)
    critic = Critic(train.shape[1]).to(train.device, train.dtype)
    optimizer = torch.optim.Adam(critic.parameters(), lr=settings.lr, betas=settings.betas)
    order, position = torch.randperm(len(train), generator=generator, device=train.device), 0
    bar = tqdm(range(settings.steps), desc=f"critic ({score} score)", disable=not progress, mininterval=2)
    for _ in bar:
        if position + settings.batch_size > len(train):
            order, position = torch.randperm(len(train), generator=generator, device=train.device), 0
        v = train[order[position : position + settings.batch_size]]
        position += settings.batch_size
        scores.fit_posterior(v, generator)
        objective = critic_values(critic, scores(v, generator), v, noise.signs(v.shape, generator, v)).mean()
        optimizer.zero_grad(set_to_none=True)
        (-objective).backward()
        optimizer.step()
    values = []
    for start in range(0, len(test), settings.batch_size):
        v = test[start : start + settings.batch_size]
        values.append(critic_values(critic, scores(v, generator), v, noise.signs(v.shape, generator, v)).detach())
    return _per_row_mean(torch.cat(values))


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
        estimate = estimate_fisher(trained.model, splits.train, splits.test, args.score, trained.posterior, settings)
    except (ConfigError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    print(f"Fisher divergence ({args.score} score): {estimate.value:.4f} ± {estimate.stderr:.4f} (test, ± 1 s.e.)")
    out = args.out or trained.path.parent.parent / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    record = {**asdict(estimate), "score": args.score, "checkpoint": str(trained.path), "settings": asdict(settings)}
    (out / f"fisher_{args.score}.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {out / f'fisher_{args.score}.json'}")


if __name__ == "__main__":
    main()
