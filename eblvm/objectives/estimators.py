"""Score estimators: objects that turn a model (and a posterior) into a score ``v ↦ ∇_v log p(v)``.

Every score-matching loss takes the score through an estimator, so "BiDSM" is DSM with the ``bism`` estimator
and "DSM" is DSM with the ``exact`` one. A score function takes ``v`` of shape ``(B, d)`` that requires grad and
returns ``(B, d)`` or ``(L, B, d)`` (one score per posterior particle), built with ``create_graph=True`` so the
loss can be differentiated in the parameters; losses average over the leading axes.

An estimator forms the energy's loss through ``higher_loss(model, q, loss, v, generator)``. The estimators here
return a score function and let the loss differentiate through it; an estimator whose parameter gradient is not
the gradient of a score (a surrogate ``zᵀ·ĝ`` with the detached residual ``z`` of ``loss.residual``) overrides
``higher_loss`` instead.

Adding an estimator: a subclass here and its entry in ``ESTIMATORS``; ``objective.estimator=<name>`` then selects
it and its constructor's keys become ``objective.<key>``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch.func import functional_call

from eblvm import noise
from eblvm.errors import require, require_choice, require_count
from eblvm.members import batch_mean
from eblvm.models.base import EnergyModel
from eblvm.objectives.score_losses import ScoreLoss
from eblvm.posteriors.base import BoundPosterior

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
Energy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def frozen_energy(model: EnergyModel) -> Energy:
    """``E(v, h)`` with the model's parameters detached: what the lower level sees while θ is held fixed."""
    detached = {name: p.detach() for name, p in model.named_parameters()}
    return lambda v, h: functional_call(model, detached, (v, h))


def fit_posterior(
    lower_loss: Callable,
    model: EnergyModel,
    posterior: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    v: torch.Tensor,
    generator: torch.Generator,
    n_steps: int,
) -> None:
    """``n_steps`` steps of ``optimizer`` on q's ``lower_loss(energy, q, v, generator)`` (averaged over rows when
    it is per row) at rows ``v`` with the model held fixed (``frozen_energy``): the plain lower level, outside a
    training step."""
    frozen, q = frozen_energy(model), BoundPosterior(posterior)
    for _ in range(n_steps):
        loss = lower_loss(frozen, q, v, generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


class ScoreEstimator:
    """How the score in a score-matching loss is obtained; ``needs_posterior`` says whether it uses ``q``."""

    name: str
    needs_posterior: bool = False
    # whether the energy's loss differentiates through q's weights, so that unrolled lower steps matter
    differentiates_posterior: bool = False

    def check_model(self, model: EnergyModel) -> None:
        """Raise ``ConfigError`` if this estimator cannot work with ``model``."""

    def check_loss(self, loss: ScoreLoss) -> None:
        """Raise ``ConfigError`` if this estimator cannot form the energy's loss with ``loss``."""

    def score_function(self, model: EnergyModel, q: BoundPosterior | None, generator: torch.Generator) -> ScoreFn:
        raise NotImplementedError

    def higher_loss(
        self,
        model: EnergyModel,
        q: BoundPosterior | None,
        loss: ScoreLoss,
        v: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The energy's loss on batch ``v``: ``loss`` applied to this estimator's score."""
        return loss(self.score_function(model, q, generator), v, generator)


class ExactScore(ScoreEstimator):
    """The model's exact marginal score ``−∇_v F(v)`` (models with a tractable free energy)."""

    name = "exact"

    def check_model(self, model: EnergyModel) -> None:
        require(
            model.has_free_energy,
            "objective.estimator",
            self.name,
            f"the exact score needs a tractable free energy, which {type(model).__name__} lacks: use objective=bism",
        )

    def score_function(self, model: EnergyModel, q: BoundPosterior | None, generator: torch.Generator) -> ScoreFn:
        return model.score


class BiSMScore(ScoreEstimator):
    """BiSM's estimate ``s(v) = ∇_v [−E(v,h) − log q(h|v)]`` with ``h ~ q(·|v̄)``, ``v̄ = v`` detached
    (docs/methods.md §1.1).

    ``h`` is reparameterised (a function of φ) but drawn at the detached ``v``, so the derivative in ``v`` sees
    only the explicit dependence of ``E`` and ``log q``. With ``n_particles = L > 1`` the score has one row per
    particle, shape ``(L, B, d)``. If ``q`` is the true posterior, every particle gives the exact score.
    """

    name = "bism"
    needs_posterior = True
    differentiates_posterior = True

    def __init__(self, n_particles: int = 1):
        require_count("n_particles", n_particles, 1)
        self.n_particles = n_particles

    def score_function(self, model: EnergyModel, q: BoundPosterior | None, generator: torch.Generator) -> ScoreFn:
        n_particles = self.n_particles

        def score(v: torch.Tensor) -> torch.Tensor:
            sample = q.rsample(q(v.detach()), n_particles, generator)
            if n_particles == 1:  # one particle: no particle axis, so no broadcast is differentiated twice; a view
                # of v, not the leaf itself, which tools that hook a module's inputs (FlopCounterMode) refuse here
                sample, v_per_particle = sample.squeeze(0), v.view_as(v)
            else:
                v_per_particle = v.expand((n_particles,) + v.shape)
            h = q.latent(sample)
            log_joint = -model(v_per_particle, h) - q.log_prob(sample, q(v_per_particle), h)
            (grad,) = torch.autograd.grad(log_joint.sum(), v_per_particle, create_graph=True)
            return grad

        return score


def _particle_weights(h: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``weights`` of the particles (``(L, ..., B)``, summing to 1 over L), or 1/L each when None."""
    if weights is None:
        return torch.full(h.shape[:-1], 1.0 / h.shape[0], dtype=h.dtype, device=h.device)
    return weights


def mean_particle_score(
    model: EnergyModel,
    v: torch.Tensor,
    h: torch.Tensor,
    weights: torch.Tensor | None = None,
    create_graph: bool = True,
) -> torch.Tensor:
    """``Σ_l w_l (−∇_v E(v, h_l))`` for particles ``h`` (``(L, ..., B, m)``; weights 1/L unless given), shape of
    ``v``. One backward pass of ``Σ_l w_l E(v, h_l)`` with ``v`` broadcast against the particles, so a deep energy
    computes its ``f(v)`` once; ``v`` is taken detached, and ``create_graph`` keeps the graph in θ."""
    v = v.detach().requires_grad_(True)
    with torch.enable_grad():
        energy = (_particle_weights(h, weights) * model(v, h)).sum()
        (grad,) = torch.autograd.grad(energy, v, create_graph=create_graph)
    return -grad


def particle_directional_scores(model: EnergyModel, v: torch.Tensor, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``a_l = zᵀ∇_v log p̃(v, h_l)`` for each particle (``(L, ..., B)``), detached: one forward-mode pass (a
    Jacobian-vector product in the direction z) with ``v`` broadcast against the particles."""
    # forward mode only, so no graph in θ is recorded; torch's first forward-mode product loads its decompositions
    # through the deprecated torch.jit.script, a warning about torch itself
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
        _, tangent = torch.func.jvp(lambda x: model(x, h), (v.detach(),), (z.detach(),))
    return -tangent


def expectation_term(
    model: EnergyModel, v: torch.Tensor, z: torch.Tensor, h: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per row, ``zᵀ Σ_l w_l (−∇_v E(v, h_l))`` with the graph in θ: its θ-gradient is ``zᵀ E_q[∂_θ ∇_v log p̃]``."""
    return (z * mean_particle_score(model, v.detach(), h, weights, create_graph=True)).sum(-1)


def covariance_term(
    model: EnergyModel,
    v: torch.Tensor,
    z: torch.Tensor,
    h: torch.Tensor,
    weights: torch.Tensor | None = None,
    factor: float = 1.0,
) -> torch.Tensor:
    """Per row, ``factor·Σ_l w_l (a_l − ā)·log p̃(v̄, h_l)`` with ``a_l = zᵀ∇_v log p̃(v, h_l)`` detached and
    ``ā = Σ_l w_l a_l``: its θ-gradient is ``factor·zᵀ Cov_w(∇_v log p̃, ∇_θ log p̃)`` (the weighted covariance;
    ``Σ_l w_l (a_l − ā) = 0``, so ``∇_θ log p̃`` needs no centring). ``log p̃`` is evaluated twice, once with only
    v on the graph (for ``a``) and once with only θ."""
    w = _particle_weights(h, weights)
    a = particle_directional_scores(model, v, h, z)
    centred = a - (w * a).sum(0)
    return factor * (w * centred * -model(v.detach(), h)).sum(0)


class VaESScore(ScoreEstimator):
    """VaES (docs/methods.md §4): ``ŝ(v) = −(1/L) Σ_l ∇_v E(v, h_l)`` with ``L = n_particles`` particles
    ``h_l ~ q(·|v̄)``, detached.

    Differentiating a loss of ``ŝ`` in θ keeps only the expectation term of ``∂_θ s`` (``vages`` adds the
    covariance). With ``refine_steps = S > 0``, each particle takes S steps of ``h ← h − ½α∇_h E(v̄, h) + σ_r ξ``
    (``α = refine_step_size``, ``σ_r = refine_noise``, ξ ~ N(0, I)) before use, through the model's
    ``conditional_energy`` (a deep energy computes its ``f(v)`` once for all particles and steps); continuous
    latents only. For losses that take the score's values only (DSM, MDSM, KSD): the particles do not follow v, so
    ``∇_v ŝ`` is not an estimate of ``∇_v s`` and SM/SSM are refused.
    """

    name = "vaes"
    needs_posterior = True

    def __init__(
        self,
        n_particles: int = 1,
        refine_steps: int = 0,
        refine_step_size: float = 1e-2,
        refine_noise: float = 1e-4,
    ):
        require_count("n_particles", n_particles, 1)
        require_count("refine_steps", refine_steps, 0)
        require(refine_step_size > 0, "refine_step_size", refine_step_size, "must be > 0")
        require(refine_noise >= 0, "refine_noise", refine_noise, "must be >= 0")
        self.n_particles = n_particles
        self.refine_steps, self.refine_step_size, self.refine_noise = refine_steps, refine_step_size, refine_noise

    def check_model(self, model: EnergyModel) -> None:
        require(
            self.refine_steps == 0 or model.latent_type == "continuous",
            "objective.refine_steps",
            self.refine_steps,
            f"latent refinement moves h by its gradient, and {type(model).__name__}'s latents are binary: set it to 0",
        )

    def check_loss(self, loss: ScoreLoss) -> None:
        require(
            loss.has_residual,
            "higher",
            loss.name,
            "VaES's particles are drawn at v detached, so its score's v-derivative misses the posterior's dependence "
            "on v (and VaGES needs a residual): use dsm, mdsm or ksd, which take the score's value only",
        )

    def particles(
        self, model: EnergyModel, q: BoundPosterior, v: torch.Tensor, n: int, generator: torch.Generator
    ) -> torch.Tensor:
        """``n`` detached particles ``h ~ q(·|v̄)`` (``(n, ..., B, m)``), refined when ``refine_steps > 0``."""
        v = v.detach()
        with torch.no_grad():
            h = q.latent(q.rsample(q(v), n, generator))
        if self.refine_steps == 0:
            return h
        with torch.no_grad():  # f(v) once, without a graph: only ∇_h is taken
            energy = model.conditional_energy(v)
        for _ in range(self.refine_steps):
            h = h.detach().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(energy(h).sum(), h)
            h = h - 0.5 * self.refine_step_size * grad + self.refine_noise * noise.gaussian(h.shape, generator, h)
        return h.detach()

    def score_function(self, model: EnergyModel, q: BoundPosterior | None, generator: torch.Generator) -> ScoreFn:
        def score(v: torch.Tensor) -> torch.Tensor:
            return mean_particle_score(model, v, self.particles(model, q, v, self.n_particles, generator))

        return score


COVARIANCES = ("unbiased", "biased", "none")


class VaGESScore(VaESScore):
    """VaGES (docs/methods.md §4): the θ-gradient ``zᵀ[E_q[∂_θ ∇_v log p̃] + Cov_q(∇_v log p̃, ∇_θ log p̃)]``
    through a scalar surrogate, for losses with a residual ``z`` (DSM, MDSM, KSD).

    Per iteration: one perturbation ``ṽ`` of the batch, then three independent sets of L detached particles from
    ``q(·|ṽ)``: one for VaES's ``ŝ(ṽ)``, hence ``z`` and the loss's value; one for the expectation term; one for
    the covariance term (``expectation_term``, ``covariance_term``). ``covariance``: ``unbiased`` (factor
    L/(L−1), so L ≥ 2), ``biased`` (factor 1) or ``none``; ``share_particles`` uses one set for all three (with
    ``covariance=none`` the gradient is then autograd's through the loss of VaES's score).
    """

    name = "vages"

    def __init__(
        self,
        n_particles: int = 2,
        covariance: str = "unbiased",
        share_particles: bool = False,
        refine_steps: int = 0,
        refine_step_size: float = 1e-2,
        refine_noise: float = 1e-4,
    ):
        super().__init__(n_particles, refine_steps, refine_step_size, refine_noise)
        require_choice("covariance", covariance, COVARIANCES)
        require(
            covariance == "none" or n_particles >= 2,
            "n_particles",
            n_particles,
            f"a sample covariance needs at least 2 particles (covariance={covariance}): set n_particles >= 2 "
            "or covariance=none",
        )
        self.covariance, self.share_particles = covariance, share_particles

    @property
    def covariance_factor(self) -> float:
        return self.n_particles / (self.n_particles - 1) if self.covariance == "unbiased" else 1.0

    def higher_loss(
        self,
        model: EnergyModel,
        q: BoundPosterior | None,
        loss: ScoreLoss,
        v: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The loss of VaES's score (its value) plus a zero-valued surrogate carrying the VaGES θ-gradient."""
        perturbation = loss.perturb(v, generator)
        x = perturbation.inputs.detach()
        n_sets = 1 if self.share_particles else 3
        h = self.particles(model, q, x, n_sets * self.n_particles, generator)
        h_z, h_expectation, h_covariance = [h] * 3 if self.share_particles else h.split(self.n_particles)
        score = mean_particle_score(model, x, h_z, create_graph=False)
        z = loss.residual(score, perturbation)
        rows = expectation_term(model, x, z, h_expectation)
        if self.covariance != "none":
            rows = rows + covariance_term(model, x, z, h_covariance, factor=self.covariance_factor)
        surrogate = batch_mean(rows, x)
        return loss.at(lambda _: score, perturbation).detach() + surrogate - surrogate.detach()


class ImportanceSampledScore(ScoreEstimator):
    """The score of the importance-sampled free energy ``F_IS(v) = −logsumexp_k(−E(v, h_k)) + m log ½ + log K``
    with ``K = n_proposals`` uniform binary proposals ``h_k ~ Bernoulli(½)^m``, fresh for every row; the score is
    autograd's ``−∇_v F_IS``. ``exp(−F_IS)`` is unbiased for ``exp(−F)``. Binary latents (IS-KSD's baseline)."""

    name = "importance"

    def __init__(self, n_proposals: int = 5):
        require_count("n_proposals", n_proposals, 1)
        self.n_proposals = n_proposals

    def check_model(self, model: EnergyModel) -> None:
        require(
            model.latent_type == "binary",
            "objective.estimator",
            self.name,
            f"uniform binary proposals need binary latents, and {type(model).__name__}'s are continuous",
        )

    @staticmethod
    def free_energy(model: EnergyModel, v: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        """``F_IS(v)`` for the proposals ``h_k`` (``(K, ..., B, m)``)."""
        n_proposals, h_dim = proposals.shape[0], proposals.shape[-1]
        log_mean = torch.logsumexp(-model(v, proposals), dim=0) - math.log(n_proposals)
        return -log_mean - h_dim * math.log(2)

    def score_function(self, model: EnergyModel, q: BoundPosterior | None, generator: torch.Generator) -> ScoreFn:
        def score(v: torch.Tensor) -> torch.Tensor:
            shape = (self.n_proposals, *v.shape[:-1], model.h_dim)
            proposals = (noise.uniform(shape, generator, v) < 0.5).to(v.dtype)
            (grad,) = torch.autograd.grad(self.free_energy(model, v, proposals).sum(), v, create_graph=True)
            return -grad

        return score


ESTIMATORS: dict[str, type[ScoreEstimator]] = {
    "exact": ExactScore,
    "bism": BiSMScore,
    "vaes": VaESScore,
    "vages": VaGESScore,
    "importance": ImportanceSampledScore,
}
