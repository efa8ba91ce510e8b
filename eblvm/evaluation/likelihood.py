"""Log-likelihood of models whose log-partition is exact or can be estimated by AIS."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eblvm.models.base import EnergyModel


@dataclass(frozen=True)
class LogPartition:
    """An estimate of ``log Z`` with its standard error (0 when exact) and how it was obtained."""

    value: float
    stderr: float
    method: str  # "exact" or "ais"

    def describe(self, ais_temperatures: int, ais_chains: int) -> str:
        return "exact" if self.method == "exact" else f"AIS ({ais_temperatures} temperatures, {ais_chains} chains)"


def has_log_likelihood(model: EnergyModel) -> bool:
    """Whether ``log p(v)`` can be evaluated: a free energy and an exact or AIS log-partition."""
    return model.has_free_energy and (model.has_exact_log_partition or model.has_ais)


def uses_exact_log_partition(model: EnergyModel, exact_max_h_dim: int) -> bool:
    """Exact ``log Z`` unless the model offers AIS and has more than ``exact_max_h_dim`` latents (a GRBM's exact
    ``log Z`` enumerates ``2^h_dim`` states)."""
    return model.has_exact_log_partition and not (model.has_ais and model.h_dim > exact_max_h_dim)


def log_partition(
    model: EnergyModel,
    exact_max_h_dim: int = 20,
    ais_temperatures: int = 1000,
    ais_chains: int = 500,
    generator: torch.Generator | None = None,
) -> LogPartition:
    """``log Z`` of ``model``: exact where ``uses_exact_log_partition``, else AIS."""
    if uses_exact_log_partition(model, exact_max_h_dim):
        with torch.no_grad():
            return LogPartition(float(model.log_partition()), 0.0, "exact")
    value, stderr = model.ais_log_partition(ais_temperatures, ais_chains, generator)
    return LogPartition(value, stderr, "ais")


def log_likelihood(model: EnergyModel, v: torch.Tensor, log_z: LogPartition) -> torch.Tensor:
    """Mean log-likelihood in nats per point: ``mean(−F(v)) − log Z``."""
    with torch.no_grad():
        return (-model.free_energy(v)).mean() - log_z.value
