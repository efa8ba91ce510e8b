"""BiDVL (docs/methods.md §5): an energy over images learned against two variational distributions, an encoder
``q_ψ(h|v)`` and a generator ``v̂ = G_φ(ĥ)``, ``ĥ ~ N(0, I)``, through a bi-level problem without MCMC.

The upper level steps the energy on data against generated images; the lower level steps the encoder and the
generator together on a bound of the symmetric KL between the model's joint ``p_θ(v) q_ψ(h|v)`` and the
variational joint ``N(h; 0, I) N(v; G_φ(h), ·)``. ``BidvlModule`` (eblvm/bilevel/bidvl.py) runs the two levels
in that order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from eblvm.errors import require, require_choice, require_count
from eblvm.models.base import EnergyModel
from eblvm.objectives.base import Objective
from eblvm.posteriors.base import BoundPosterior, Posterior

UPPER_LOSSES = ("diff", "hinge")
FreeEnergy = Callable[[torch.Tensor], torch.Tensor]


def gaussian_kl_to_prior(mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """``KL(N(μ, diag σ²) ‖ N(0, I)) = −½ Σ_j (1 + log σ_j² − μ_j² − σ_j²)`` per row, shape ``(..., B)``."""
    return -0.5 * (1 + 2 * log_std - mean**2 - torch.exp(2 * log_std)).sum(-1)


def reconstruction_errors(images: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, torch.Tensor]:
    """The squared error of rows ``(B, d)``: ``per_image_sum`` ``mean_b Σ_i (x̂_bi − x_bi)²`` and ``per_pixel_mean``
    ``mean_b mean_i (x̂_bi − x_bi)²`` (= per_image_sum / d, with d = C·H·W)."""
    squared = (reconstructions - images) ** 2
    return {"per_image_sum": squared.sum(-1).mean(), "per_pixel_mean": squared.mean()}


class BiDVL(Objective):
    """The two levels of BiDVL (docs/methods.md §5), for an energy with a free energy ``E(v)``.

    Upper level (θ; generated images detached): ``diff`` ``mean E(v) − mean E(v̂)``, or ``hinge``
    ``mean relu(1 + E(v)) + mean relu(1 − E(v̂))``.

    Lower level (ψ, φ; θ fixed), with ``v̂ = G(ĥ)``:

    ``mean E(v̂) + λ_cyc · mean ‖μ_ψ(v̂) − ĥ‖² + λ_vae · mean (‖G(h) − v‖² + KL(q_ψ(h|v) ‖ N(0, I)))``,

    squared norms summed over dimensions and means over the batch; ``h ~ q_ψ(·|v)`` reparameterised on real
    data, and ψ held fixed in the cycle term (its gradient reaches φ through v̂ only). ``lambda_cycle`` null is
    ``1/h_dim``. ``fresh_latent``: the lower level draws its own ``ĥ′`` instead of reusing the upper level's ``ĥ``.
    """

    needs_posterior = True
    needs_generator = True

    def __init__(
        self,
        upper: str = "diff",
        lambda_vae: float = 0.05,
        lambda_cycle: float | None = None,
        fresh_latent: bool = False,
        n_lower_steps: int = 1,
    ):
        super().__init__()
        require_choice("upper", upper, UPPER_LOSSES)
        require(lambda_vae >= 0, "lambda_vae", lambda_vae, "must be >= 0")
        require(
            lambda_cycle is None or lambda_cycle >= 0, "lambda_cycle", lambda_cycle, "must be >= 0, or null: 1/h_dim"
        )
        require_count("n_lower_steps", n_lower_steps, 1)
        self.upper, self.lambda_vae, self.lambda_cycle = upper, lambda_vae, lambda_cycle
        self.fresh_latent, self.n_lower_steps = fresh_latent, n_lower_steps

    def check_model(self, model: EnergyModel, latent_type: str | None) -> None:
        require(
            model.has_free_energy and model.image_shape is not None,
            "model",
            type(model).__name__,
            "BiDVL learns an energy E(v) over images: use model=sn_cnn_energy or model=sn_resnet_energy",
        )
        require(
            latent_type == "continuous",
            "posterior",
            latent_type,
            "BiDVL's encoder is Gaussian: use posterior=gaussian_encoder",
        )

    def check_data(self, datamodule) -> None:
        require(
            datamodule.pixel_range == "symmetric",
            "data.pixel_range",
            datamodule.pixel_range,
            "BiDVL's generator ends in tanh: train on [-1, 1] with data.pixel_range=symmetric",
        )

    def cycle_weight(self, h_dim: int) -> float:
        return 1.0 / h_dim if self.lambda_cycle is None else self.lambda_cycle

    def upper_loss(self, energy: FreeEnergy, v: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """The energy's loss on data ``v`` against generated rows (detached here)."""
        data_energy, generated_energy = energy(v), energy(generated.detach())
        if self.upper == "hinge":
            return torch.relu(1 + data_energy).mean() + torch.relu(1 - generated_energy).mean()
        return data_energy.mean() - generated_energy.mean()

    def lower_terms(
        self,
        energy: FreeEnergy,
        encoder: Posterior,
        generator_net: nn.Module,
        v: torch.Tensor,
        latent: torch.Tensor,
        generated: torch.Tensor,
        noise: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """The lower level's terms (each a batch mean) and ``loss``, their weighted sum. ``energy`` is the energy
        with θ held fixed; ``generated = G(latent)`` on the graph of φ."""
        encoder_fixed = BoundPosterior.detached(encoder)
        cycle = ((encoder_fixed.mean(encoder_fixed(generated)) - latent) ** 2).sum(-1).mean()
        dist = encoder(v)
        h = encoder.latent(encoder.rsample(dist, 1, noise))[0]
        reconstruction = reconstruction_errors(v, generator_net(h))["per_image_sum"]
        kl = gaussian_kl_to_prior(*dist).mean()
        generated_energy = energy(generated).mean()
        loss = generated_energy + self.cycle_weight(encoder.h_dim) * cycle + self.lambda_vae * (reconstruction + kl)
        return {
            "loss": loss,
            "generated_energy": generated_energy,
            "cycle": cycle,
            "reconstruction": reconstruction,
            "kl": kl,
        }
