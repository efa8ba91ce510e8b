"""What the bi-level training step asks of a learning objective."""

from __future__ import annotations

import torch
from torch import nn

from eblvm.errors import require
from eblvm.models.base import EnergyModel
from eblvm.objectives.lower import Energy
from eblvm.posteriors.base import BoundPosterior


class Objective(nn.Module):
    """A loss for the energy (``higher_loss``) and, when ``needs_posterior``, one for q (``lower_loss``).

    Each iteration takes ``n_lower_steps`` real steps of q on ``lower_loss`` with the energy held fixed,
    ``n_unroll`` differentiable ones, then one energy step on ``higher_loss``. An objective is a module so that
    its own learned parameters (NCE's log-normaliser) join the energy's optimizer and its state (PCD's chains)
    is saved in checkpoints.
    """

    needs_posterior: bool = False
    needs_generator: bool = False  # trains a generator network of the ``generator`` group (BiDVL)
    n_lower_steps: int = 0
    n_unroll: int = 0
    # Buffers that differ between DDP ranks (each rank's persistent chains): checkpoints keep every rank's.
    per_rank_buffers: tuple[str, ...] = ()

    def higher_loss(
        self, model: EnergyModel, q: BoundPosterior | None, v: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        raise NotImplementedError

    def lower_loss(self, energy: Energy, q: BoundPosterior, v: torch.Tensor, generator: torch.Generator):
        raise NotImplementedError(f"{type(self).__name__} trains no posterior")

    def validation_loss(
        self, model: EnergyModel, q: BoundPosterior | None, v: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """The loss on held-out data; it must not change the objective's state (e.g. persistent chains)."""
        return self.higher_loss(model, q, v, generator)

    def with_exact_score(self) -> Objective | None:
        """The same objective with the model's exact score in place of an estimated one, where that is defined
        (the reference of the gradient bias); None otherwise."""
        return None

    def prepare(self, train_data: torch.Tensor) -> None:
        """Called once with the training data before training (e.g. to fit a noise distribution)."""

    def check_data(self, datamodule) -> None:
        """Raise ``ConfigError`` if this objective cannot train on ``datamodule``'s data (e.g. its pixel scale)."""

    def check_model(self, model: EnergyModel, latent_type: str | None) -> None:
        """Raise ``ConfigError`` if this objective cannot train ``model`` (posterior latents ``latent_type``)."""


def require_free_energy(model: EnergyModel, objective_name: str) -> None:
    require(
        model.has_free_energy,
        "objective",
        objective_name,
        f"needs a tractable free energy, which {type(model).__name__} lacks: use objective=bism",
    )


def require_gibbs_sampler(model: EnergyModel, objective_name: str) -> None:
    require(
        model.has_gibbs_sampler,
        "objective",
        objective_name,
        f"needs a Gibbs sampler, which {type(model).__name__} lacks (model=grbm has one)",
    )
