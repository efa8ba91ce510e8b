"""Drawing samples from a trained model the way its figures and metrics need them: Gibbs for GRBMs, annealed
Langevin (in one of three modes) for deep energies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from eblvm import noise
from eblvm.errors import ConfigError, require, require_choice, require_count
from eblvm.models.base import EnergyModel
from eblvm.posteriors.base import Posterior
from eblvm.sampling.gibbs import gibbs_sample
from eblvm.sampling.langevin import SAMPLING_MODES, LangevinSchedule, langevin_sample

GENERATOR_MODE = "generator"
MODES = ("auto", *SAMPLING_MODES, GENERATOR_MODE)


@dataclass(frozen=True)
class SamplingConfig:
    """``sampling.*``: models with a Gibbs sampler (GRBMs) are sampled by ``gibbs_sweeps`` Gibbs sweeps
    (``n_samples`` for the figures); deep energies by annealed Langevin (``langevin.*``, docs/methods.md §3),
    ``n_images`` per grid, in ``mode``:

    - ``marginal``: v alone under a latent-free energy ``F(v)``;
    - ``joint``: v and h together under ``E(v, h)``;
    - ``via_q``: h fixed to q's mean for real training images, v from ``E(v, h)`` (the papers' figures and FIDs);
    - ``generator``: ``G(ĥ)``, ``ĥ ~ N(0, I)``, in one forward pass of a trained generator (BiDVL), no Langevin;
    - ``auto``: ``generator`` when a generator is trained, ``marginal`` for latent-free models, ``via_q`` when a
      posterior is trained, else ``joint``.
    """

    n_samples: int = 1000
    gibbs_sweeps: int = 1000
    mode: str = "auto"
    n_images: int = 64
    langevin: LangevinSchedule = field(default_factory=LangevinSchedule)

    def __post_init__(self):
        require_choice("mode", self.mode, MODES)
        for key in ("n_samples", "gibbs_sweeps", "n_images"):
            require_count(key, getattr(self, key), 1)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplingConfig:
        values = dict(values)
        try:
            schedule = LangevinSchedule(**values.pop("langevin", {}))
        except ConfigError as error:
            raise error.with_prefix("langevin") from None
        return cls(langevin=schedule, **values)

    def resolve_mode(
        self, model: EnergyModel, posterior: Posterior | None, generator_net: nn.Module | None = None
    ) -> str:
        """The sampling mode for this model, checked: ``auto`` resolved, impossible choices refused."""
        latent_free = model.h_dim == 0
        if self.mode == "auto":
            if generator_net is not None:
                return GENERATOR_MODE
            return "marginal" if latent_free else ("via_q" if posterior is not None else "joint")
        if self.mode == GENERATOR_MODE:
            require(generator_net is not None, "mode", self.mode, "needs a trained generator (objective=bidvl)")
        elif self.mode == "marginal":
            require(
                model.has_free_energy, "mode", self.mode, f"needs a latent-free energy, {type(model).__name__} has h"
            )
        else:
            require(not latent_free, "mode", self.mode, f"{type(model).__name__} has no latent: use mode=marginal")
            require(
                self.mode != "via_q" or posterior is not None,
                "mode",
                self.mode,
                "needs a trained posterior (an objective with estimator=bism): use mode=joint",
            )
        return self.mode


def draw_samples(
    model: EnergyModel,
    posterior: Posterior | None,
    config: SamplingConfig,
    n_samples: int,
    generator: torch.Generator,
    reference: torch.Tensor | None = None,
    mean: bool = True,
    progress: bool = False,
    generator_net: nn.Module | None = None,
) -> torch.Tensor:
    """``n_samples`` rows ``(n, d)``: Gibbs for models with a Gibbs sampler (``E[v|h]`` of the last sweep when
    ``mean``), one pass of ``generator_net`` in ``generator`` mode, annealed Langevin otherwise (``reference``
    holds the training rows whose posterior means ``via_q`` fixes)."""
    if model.has_gibbs_sampler:
        return gibbs_sample(model, n_samples, config.gibbs_sweeps, generator, return_mean=mean)
    mode = config.resolve_mode(model, posterior, generator_net)
    if mode == GENERATOR_MODE:
        like = next(generator_net.parameters())
        with torch.no_grad():
            return generator_net(noise.gaussian((n_samples, generator_net.h_dim), generator, like))
    return langevin_sample(
        model,
        mode,
        n_samples,
        config.langevin,
        generator,
        posterior=posterior,
        reference=reference,
        progress=progress,
    )
