"""Annealed Langevin dynamics for deep energies (docs/methods.md §3).

One step at temperature ``T`` moves every tensor ``x`` of the state by

    ``x ← x − ½σ²∇_x E + √T·σ·ξ``,   ``ξ ~ N(0, I)`` fresh per tensor and step,

with the gradient taken at the current point; after the last step one denoising step ``x ← x − σ0²∇_x E``
removes the last noise (Tweedie). The default schedule is the papers': 500 steps at ``T = 100``, 2000 steps
``T_k = 100·100^(−k/2000)`` (``k = 0..1999``, so ``T = 1`` is never reached), 200 steps ``linspace(1, 0, 200)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from eblvm.errors import require, require_choice, require_count
from eblvm.models.base import EnergyModel
from eblvm.posteriors.base import BoundPosterior, Posterior

SAMPLING_MODES = ("marginal", "joint", "via_q")


@dataclass(frozen=True)
class LangevinSchedule:
    """Step size, temperatures, denoising and start of annealed Langevin dynamics.

    ``step_size`` is ``σ``; ``hot_steps`` steps run at ``hot_temperature``, then ``anneal_steps`` steps at
    ``T_k = hot_temperature · hot_temperature^(−k/anneal_steps)``, ``k = 0..anneal_steps−1``, then
    ``cool_steps`` steps at ``linspace(1, 0, cool_steps)`` (the last at ``T = 0``). ``denoise_sigma`` is ``σ0``
    of the final step ``x ← x − σ0²∇_x E`` (0 or None: no denoising). Chains start at
    ``init_mean + init_std·N(0, I)``. ``hot_temperature=1, anneal_steps=0, cool_steps=0`` is plain Langevin at
    ``T = 1`` for ``hot_steps`` steps.
    """

    step_size: float = 0.02
    hot_steps: int = 500
    hot_temperature: float = 100.0
    anneal_steps: int = 2000
    cool_steps: int = 200
    denoise_sigma: float | None = 0.1
    init_mean: float = 0.5
    init_std: float = 1.0

    def __post_init__(self):
        require(self.step_size > 0, "step_size", self.step_size, "must be > 0")
        require(self.hot_temperature > 0, "hot_temperature", self.hot_temperature, "must be > 0")
        for key in ("hot_steps", "anneal_steps", "cool_steps"):
            require_count(key, getattr(self, key), 0)
        require(
            self.denoise_sigma is None or self.denoise_sigma >= 0,
            "denoise_sigma",
            self.denoise_sigma,
            "must be >= 0, or null (or 0) to skip the denoising step",
        )
        require(self.init_std >= 0, "init_std", self.init_std, "must be >= 0")

    def temperatures(self) -> torch.Tensor:
        """The temperature of every step, float64 of length ``hot_steps + anneal_steps + cool_steps``."""
        k = torch.arange(self.anneal_steps, dtype=torch.float64)
        return torch.cat(
            [
                torch.full((self.hot_steps,), float(self.hot_temperature), dtype=torch.float64),
                self.hot_temperature * self.hot_temperature ** (-k / self.anneal_steps),
                torch.linspace(1.0, 0.0, self.cool_steps, dtype=torch.float64),
            ]
        )

    def initial(self, shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
        """A start ``init_mean + init_std·N(0, I)`` of ``shape``, on the device and in the dtype of ``like``."""
        return self.init_mean + self.init_std * torch.randn(
            shape, generator=generator, dtype=like.dtype, device=like.device
        )


def _energy_gradients(energy: Callable[..., torch.Tensor], xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``∇_x Σ_b E(x)_b`` for every tensor of ``xs``, from fresh leaves so that no graph outlives the call."""
    with torch.enable_grad():
        leaves = tuple(x.detach().requires_grad_(True) for x in xs)
        return torch.autograd.grad(energy(*leaves).sum(), leaves)


def _standard_normal(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``ξ ~ N(0, I)`` of the shape, dtype and device of ``x``."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


@torch.no_grad()
def annealed_langevin(
    energy: Callable[..., torch.Tensor],
    init: tuple[torch.Tensor, ...],
    schedule: LangevinSchedule,
    generator: torch.Generator | None,
    progress: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Run ``x ← x − ½σ²∇_x E + √T·σ·ξ`` jointly on the tensors of ``init`` over ``schedule.temperatures()``.

    ``energy(*xs)`` returns one energy per chain, shape ``(B,)``; each step differentiates ``energy(*xs).sum()``
    at the current point and draws ``ξ ~ N(0, I)`` for each tensor from ``generator``. The run ends with the
    denoising step ``x ← x − σ0²∇_x E`` when ``schedule.denoise_sigma`` is set. The returned tensors carry no
    graph; memory does not grow with the number of steps, and callers under ``torch.no_grad()`` work.
    ``progress`` shows a tqdm bar over the steps.
    """
    require(len(init) >= 1, "init", init, "needs at least one tensor to sample")
    sigma = schedule.step_size
    xs = tuple(x.detach() for x in init)
    for temperature in tqdm(schedule.temperatures().tolist(), desc="annealed Langevin", disable=not progress):
        grads = _energy_gradients(energy, xs)
        noise_scale = math.sqrt(temperature) * sigma
        xs = tuple(
            x - 0.5 * sigma**2 * g + noise_scale * _standard_normal(x, generator)
            for x, g in zip(xs, grads, strict=True)
        )
    if schedule.denoise_sigma:
        grads = _energy_gradients(energy, xs)
        xs = tuple(x - schedule.denoise_sigma**2 * g for x, g in zip(xs, grads, strict=True))
    return xs


def langevin_sample(
    model: EnergyModel,
    mode: str,
    n_samples: int,
    schedule: LangevinSchedule,
    generator: torch.Generator | None,
    posterior: Posterior | BoundPosterior | None = None,
    reference: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """``n_samples`` visible samples ``(n_samples, v_dim)`` of ``model`` by annealed Langevin dynamics.

    ``mode`` (report it with any number computed from the samples):

    - ``marginal``: ``v`` alone on the free energy ``F(v)`` of a latent-free model (``has_free_energy``);
    - ``joint``: ``v`` and ``h`` together on ``E(v, h)``, both started at ``init_mean + init_std·N(0, I)`` and
      both denoised; ``v`` is returned;
    - ``via_q``: ``h`` fixed to the posterior mean ``E_q[h|v_ref]`` of real rows ``reference`` (cycled to
      ``n_samples`` rows; ``posterior`` gives ``dist = posterior(v)`` and ``posterior.mean(dist)``), and ``v``
      sampled from ``p(v|h) ∝ exp(−E(v, h))``. The BiSM and VaGES image figures use this mode.
    """
    require_choice("mode", mode, SAMPLING_MODES)
    require_count("n_samples", n_samples, 1)
    like = next(model.parameters())
    v0 = schedule.initial((n_samples, model.v_dim), generator, like)
    if mode == "marginal":
        require(
            model.has_free_energy,
            "mode",
            mode,
            f"{type(model).__name__} has no free energy F(v): sample it with mode joint or via_q",
        )
        (v,) = annealed_langevin(model.free_energy, (v0,), schedule, generator, progress)
        return v
    if mode == "joint":
        h0 = schedule.initial((n_samples, model.h_dim), generator, like)
        v, _ = annealed_langevin(model, (v0, h0), schedule, generator, progress)
        return v
    require(
        reference is not None and len(reference) >= 1,
        "reference",
        reference,
        "mode via_q needs real training rows to take h from",
    )
    require(posterior is not None, "posterior", posterior, "mode via_q needs a posterior q(h|v)")
    rows = reference[torch.arange(n_samples, device=reference.device) % reference.shape[0]]
    with torch.no_grad():
        h = posterior.mean(posterior(rows.to(like)))
    (v,) = annealed_langevin(lambda v: model(v, h), (v0,), schedule, generator, progress)
    return v
