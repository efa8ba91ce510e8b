"""Score-matching losses as parts: each owns its noise (perturbation and levels) and its row weights.

A loss is called with a score function and a clean batch, ``loss(score_fn, v, generator)``, draws its own noise
from ``generator`` and returns the batch mean (``batch_mean``: one per member for an ensemble's ``(S, B, d)``
batch); with per-particle scores ``(L, B, d)`` the per-particle losses are averaged too (KSD averages the scores
first). ``perturb`` gives the
input the score is evaluated at (the lower level fits q on the same kind of input) and ``row_weights`` the
weights of the lower loss's rows. ``residual`` is the detached vector ``z`` with ``z_i = B·∂L/∂s_i`` for the batch
loss ``L`` and the score ``s_i`` of row ``i`` of ``B`` (for a per-row loss, its derivative in that row's score), for
estimators that form a surrogate ``mean_i z_iᵀ·ĝ_i`` instead of differentiating a score (VaGES, docs/methods.md §4).

Adding a loss: a subclass here and its entry in ``SCORE_LOSSES``; ``objective.higher=<name>`` selects it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from eblvm import noise
from eblvm.errors import require, require_choice
from eblvm.members import batch_mean

NOISE_GRIDS = ("linear", "geometric")
PROBES = ("rademacher", "gaussian")

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Perturbation:
    """The input ``inputs = v + σ ε`` a score is evaluated at, with its noise ``ε`` and levels ``σ`` (B, 1);
    clean-data losses leave ``noise`` and ``sigma`` None."""

    inputs: torch.Tensor
    noise: torch.Tensor | None = None
    sigma: torch.Tensor | None = None
    # what a loss derives from the inputs alone, kept so that it is computed once per perturbation (KSD's kernel)
    derived: dict = field(default_factory=dict, compare=False, repr=False)


def _with_grad(v: torch.Tensor) -> torch.Tensor:
    return v if v.requires_grad else v.detach().requires_grad_(True)


def _input_gradient(total: torch.Tensor, v: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """``∇_v total`` divided by the number of particles in ``score``: the gradient of a particle mean."""
    (grad,) = torch.autograd.grad(total, v, create_graph=True)
    return grad / (score.numel() // v.numel())


class ScoreLoss:
    """A score-matching loss; ``noised`` says whether it perturbs the data (the lower level then fits q on
    perturbed data with fresh noise)."""

    name: str
    noised: bool = False
    # whether ``residual`` is defined: the loss takes the score's values only (not its v-derivative), and its
    # θ-gradient is linear in each row's score's θ-gradient
    has_residual: bool = False

    def perturb(self, v: torch.Tensor, generator: torch.Generator) -> Perturbation:
        """The input the score is evaluated at; clean data for losses that add no noise (draws nothing)."""
        return Perturbation(v)

    def row_weights(self, perturbation: Perturbation) -> torch.Tensor | None:
        """Weights of the lower loss's rows (None: all 1)."""
        return None

    def residual(self, score: torch.Tensor, perturbation: Perturbation) -> torch.Tensor:
        """``z_i = B·∂L/∂s_i`` at the scores ``score`` of the rows of ``perturbation.inputs``, detached."""
        raise NotImplementedError(f"{self.name} has no residual form")

    def at(self, score_fn: ScoreFn, perturbation: Perturbation) -> torch.Tensor:
        """The loss at a given perturbation (noise shared with another evaluation)."""
        raise NotImplementedError

    def __call__(self, score_fn: ScoreFn, v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.at(score_fn, self.perturb(v, generator))


class ExactSM(ScoreLoss):
    """Hyvärinen's SM with the exact Hessian trace: ``½‖s(v)‖² + Σ_i ∂s_i(v)/∂v_i``.

    One backward pass per dimension: for low dimensions. With the exact score this is the Fisher divergence to
    the data minus a data constant (the "SM objective" metric; lower is better, it can be negative).
    """

    name = "sm"

    def __call__(self, score_fn: ScoreFn, v: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return score_matching(score_fn, v)


def score_matching(score_fn: ScoreFn, v: torch.Tensor) -> torch.Tensor:
    """``mean[½‖s(v)‖² + tr ∇_v s(v)]`` with the trace from one backward pass per dimension (see ``ExactSM``)."""
    v = _with_grad(v)
    score = score_fn(v)
    trace = sum(_input_gradient(score[..., i].sum(), v, score)[..., i] for i in range(v.shape[-1]))
    return batch_mean(0.5 * (score**2).sum(-1) + trace, v)


class SlicedSM(ScoreLoss):
    """SSM (Song et al. 2019) on clean data, one projection ``u`` per row: ``½‖s(v)‖² + uᵀ∇_v(uᵀ s(v))``.

    ``probe``: ``rademacher`` (``u ∈ {±1}^d``) or ``gaussian`` (``u ~ N(0, I)``).
    """

    name = "ssm"

    def __init__(self, probe: str = "rademacher"):
        require_choice("probe", probe, PROBES)
        self.probe = probe

    def draw_probe(self, v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.probe == "gaussian":
            return noise.gaussian(v.shape, generator, v)
        return noise.signs(v.shape, generator, v)

    def with_probe(self, score_fn: ScoreFn, v: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
        """The loss for a given projection ``probe`` (shape of ``v``)."""
        v = _with_grad(v)
        score = score_fn(v)
        trace_estimate = (probe * _input_gradient((probe * score).sum(), v, score)).sum(-1)
        return batch_mean(0.5 * (score**2).sum(-1) + trace_estimate, v)

    def __call__(self, score_fn: ScoreFn, v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.with_probe(score_fn, v, self.draw_probe(v, generator))


class DenoisingSM(ScoreLoss):
    """DSM (BiDSM with the BiSM estimator): ``½‖s(ṽ) + ε/σ‖²`` with ``ṽ = v + σε``, ``ε ~ N(0, I)``.

    ``sigma`` is one level, or in an ensemble whose members vary it a tensor of one level per member.
    """

    name = "dsm"
    noised = True
    has_residual = True

    def __init__(self, sigma: float = 0.05):
        require(sigma > 0, "sigma", sigma, "noise levels must be > 0")
        self.sigma: float | torch.Tensor = sigma

    def levels(self, v: torch.Tensor) -> torch.Tensor:
        """The noise level of every row, shape ``(B, 1)`` (``(S, B, 1)`` for an ensemble's batch)."""
        if not isinstance(self.sigma, torch.Tensor):
            return torch.full(v.shape[:-1] + (1,), self.sigma, device=v.device, dtype=v.dtype)
        return self.sigma.to(v).reshape(-1, 1, 1).expand(v.shape[:-1] + (1,))

    def perturb(self, v: torch.Tensor, generator: torch.Generator) -> Perturbation:
        sigma = self.levels(v)
        eps = noise.gaussian(v.shape, generator, v)
        return Perturbation(v + sigma * eps, eps, sigma)

    def residual(self, score: torch.Tensor, perturbation: Perturbation) -> torch.Tensor:
        """``z = s(ṽ) + ε/σ``, the derivative of ``½‖s(ṽ) + ε/σ‖²`` in ``s``."""
        return (score + perturbation.noise / perturbation.sigma).detach()

    def at(self, score_fn: ScoreFn, perturbation: Perturbation) -> torch.Tensor:
        score = score_fn(_with_grad(perturbation.inputs))
        return batch_mean(0.5 * ((score + perturbation.noise / perturbation.sigma) ** 2).sum(-1), perturbation.inputs)


class MultiscaleDSM(DenoisingSM):
    """MDSM (Li, Chen & Sommer 2019): ``½‖s(ṽ_i)/σ_i + ε_i/σ0²‖²`` with ``ṽ_i = v_i + σ_i ε_i``.

    Row ``i`` of a batch of ``B`` has level ``σ_i = linspace(sigma_begin, sigma_end, B)[i]`` (``noise_grid=linear``)
    or ``exp(linspace(log sigma_begin, log sigma_end, B))[i]`` (``geometric``), endpoints included; the lower
    loss's rows are weighted by ``1/σ_i``.
    """

    name = "mdsm"

    def __init__(
        self, sigma_begin: float = 0.05, sigma_end: float = 1.2, noise_grid: str = "geometric", sigma0: float = 0.1
    ):
        require_choice("noise_grid", noise_grid, NOISE_GRIDS)
        for key, value in (("sigma_begin", sigma_begin), ("sigma0", sigma0)):
            require(value > 0, key, value, "noise levels must be > 0")
        require(sigma_end > sigma_begin, "sigma_end", sigma_end, f"must be > sigma_begin={sigma_begin}")
        self.sigma_begin, self.sigma_end, self.noise_grid, self.sigma0 = sigma_begin, sigma_end, noise_grid, sigma0

    def levels(self, v: torch.Tensor) -> torch.Tensor:
        batch = v.shape[-2]
        if self.noise_grid == "linear":
            grid = torch.linspace(self.sigma_begin, self.sigma_end, batch, device=v.device, dtype=v.dtype)
        else:
            log_grid = torch.linspace(
                math.log(self.sigma_begin), math.log(self.sigma_end), batch, device=v.device, dtype=v.dtype
            )
            grid = torch.exp(log_grid)
        return grid[:, None]

    def row_weights(self, perturbation: Perturbation) -> torch.Tensor:
        return 1 / perturbation.sigma[..., 0]

    def residual(self, score: torch.Tensor, perturbation: Perturbation) -> torch.Tensor:
        """``z_i = (s(ṽ_i)/σ_i + ε_i/σ0²)/σ_i``, the derivative of ``½‖s(ṽ_i)/σ_i + ε_i/σ0²‖²`` in ``s``."""
        sigma = perturbation.sigma
        return ((score / sigma + perturbation.noise / self.sigma0**2) / sigma).detach()

    def at(self, score_fn: ScoreFn, perturbation: Perturbation) -> torch.Tensor:
        score = score_fn(_with_grad(perturbation.inputs))
        sigma, eps = perturbation.sigma, perturbation.noise
        return batch_mean(0.5 * ((score / sigma + eps / self.sigma0**2) ** 2).sum(-1), perturbation.inputs)


@dataclass(frozen=True)
class KernelPairs:
    """The RBF kernel terms of KSD's pairs ``x = v[B/2 + i]``, ``x' = v[i]`` (``(..., B/2)`` or ``(..., B/2, d)``)."""

    kernel: torch.Tensor  # k(x, x')
    grad_x: torch.Tensor  # ∇_x k(x, x') = −(x − x')/h² · k; ∇_x' k is its negative
    trace: torch.Tensor  # tr ∇_x ∇_x' k(x, x') = k · (d/h² − ‖x − x'‖²/h⁴)


class KernelStein(ScoreLoss):
    """The kernelised Stein discrepancy on the paired half-batch U-statistic, through its one-sided surrogate.

    For ``B`` rows the pairs are ``x_i = v[n + i]``, ``x'_i = v[i]``, ``i < n = ⌊B/2⌋`` (an odd batch's last row is
    left out), with the RBF kernel ``k(x, y) = exp(−‖x − y‖²/(2h²))``. The value is the U-statistic
    ``u(x, x') = k s(x)ᵀs(x') + s(x)ᵀ∇_x' k + s(x')ᵀ∇_x k + tr ∇_x∇_x' k`` averaged over the pairs; its θ-gradient is
    that of the surrogate ``zᵀ s(x')`` with ``z = k s(x) + ∇_x k`` detached: half the gradient of ``u`` (the
    surrogate on ``(x', x)`` gives the other half), the same for every score (exact, importance-sampled, VaGES), so
    their learning rates compare. On clean data; per-particle scores ``(L, B, d)`` are averaged first.

    ``bandwidth``: ``h`` itself (the VaGES authors' 0.1), or ``median``: the median distance between the batch's rows
    (detached; per member in an ensemble).
    """

    name = "ksd"
    has_residual = True

    def __init__(self, bandwidth: float | str = 0.1):
        if isinstance(bandwidth, str):
            require_choice("bandwidth", bandwidth, ("median",))
        else:
            require(bandwidth > 0, "bandwidth", bandwidth, "must be > 0 or 'median'")
        self.bandwidth = bandwidth

    def _bandwidth(self, v: torch.Tensor) -> torch.Tensor | float:
        if self.bandwidth != "median":
            return self.bandwidth
        v = v.detach()
        distances = torch.cdist(v, v)
        upper = torch.triu_indices(v.shape[-2], v.shape[-2], offset=1, device=v.device)
        return torch.quantile(distances[..., upper[0], upper[1]], 0.5, dim=-1, keepdim=True)

    @staticmethod
    def halves(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, x')``: rows ``n … 2n−1`` and rows ``0 … n−1`` of the batch, ``n = ⌊B/2⌋``."""
        n = v.shape[-2] // 2
        return v[..., n : 2 * n, :], v[..., :n, :]

    def kernel_pairs(self, v: torch.Tensor) -> KernelPairs:
        x, x_prime = self.halves(v.detach())
        h2 = torch.as_tensor(self._bandwidth(v), dtype=v.dtype, device=v.device) ** 2
        difference = x - x_prime
        squared = (difference**2).sum(-1)
        kernel = torch.exp(-squared / (2 * h2))
        grad_x = -difference / h2[..., None] * kernel[..., None]
        trace = kernel * (v.shape[-1] / h2 - squared / h2**2)
        return KernelPairs(kernel, grad_x, trace)

    def u_statistic(self, score: torch.Tensor, pairs: KernelPairs) -> torch.Tensor:
        """``u(x_i, x'_i)`` per pair (``(..., n)``) for the scores of the batch's rows."""
        s, s_prime = self.halves(score)
        return (
            pairs.kernel * (s * s_prime).sum(-1)
            - (s * pairs.grad_x).sum(-1)  # s(x)ᵀ∇_x' k, with ∇_x' k = −∇_x k
            + (s_prime * pairs.grad_x).sum(-1)
            + pairs.trace
        )

    def one_sided(self, score: torch.Tensor, pairs: KernelPairs) -> torch.Tensor:
        """``z_i = k(x_i, x'_i) s(x_i) + ∇_x k(x_i, x'_i)`` per pair (``(..., n, d)``), detached."""
        return (pairs.kernel[..., None] * self.halves(score)[0] + pairs.grad_x).detach()

    def pairs_of(self, perturbation: Perturbation) -> KernelPairs:
        """``kernel_pairs`` of the perturbation's inputs, computed once per perturbation: the residual and the
        loss's value at the same inputs share them."""
        key = ("kernel_pairs", self.bandwidth)
        if key not in perturbation.derived:
            perturbation.derived[key] = self.kernel_pairs(perturbation.inputs)
        return perturbation.derived[key]

    def residual(self, score: torch.Tensor, perturbation: Perturbation) -> torch.Tensor:
        """``2z`` on the rows ``x'`` (the mean runs over ``n ≈ B/2`` pairs, not B rows) and 0 on the others."""
        z = self.one_sided(score, self.pairs_of(perturbation))
        rows = torch.zeros_like(score)
        rows[..., : z.shape[-2], :] = z * (score.shape[-2] / z.shape[-2])
        return rows

    def at(self, score_fn: ScoreFn, perturbation: Perturbation) -> torch.Tensor:
        v = perturbation.inputs
        pairs = self.pairs_of(perturbation)
        score = score_fn(_with_grad(v))
        if score.dim() > v.dim():  # one score per posterior particle: their mean
            score = score.mean(0)
        surrogate = batch_mean((self.one_sided(score, pairs) * self.halves(score)[1]).sum(-1), v)
        return batch_mean(self.u_statistic(score.detach(), pairs), v) + surrogate - surrogate.detach()


SCORE_LOSSES: dict[str, type[ScoreLoss]] = {
    "sm": ExactSM,
    "ssm": SlicedSM,
    "dsm": DenoisingSM,
    "mdsm": MultiscaleDSM,
    "ksd": KernelStein,
}
