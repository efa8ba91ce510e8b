"""GRBM log-likelihood: exact log-partition by enumeration, or annealed importance sampling (AIS)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eblvm.models.grbm import GRBM


@dataclass(frozen=True)
class LogPartition:
    """An estimate of ``log Z`` with its standard error (0 when exact) and how it was obtained."""

    value: float
    stderr: float
    method: str  # "exact" or "ais"


@torch.no_grad()
def ais_log_partition(
    model: GRBM, n_temperatures: int = 1000, n_chains: int = 500, generator: torch.Generator | None = None
) -> LogPartition:
    """AIS estimate of a GRBM's ``log Z`` (Salakhutdinov & Murray 2008).

    Base model: ``W = 0, c = 0``, whose ``log Z₀ = Σ log σ_i + (d/2) log 2π + m log 2`` and whose visible
    marginal ``N(b, diag σ²)`` is sampled exactly. Intermediate models scale ``W`` and ``c`` by
    ``β_k = k/(K−1)``. For ``k = 1..K−1``: ``log w += F_{β_{k−1}}(v) − F_{β_k}(v)``, then one Gibbs sweep at
    ``β_k``. ``log Ẑ = logmeanexp(log w) + log Z₀``; its standard error is ``std(w)/(√n mean(w))`` (delta
    method). AIS is unbiased for ``Z``, so ``log Ẑ`` is biased low by roughly half its variance.
    """
    sigma = torch.exp(model.log_sigma)
    betas = torch.linspace(0, 1, n_temperatures, dtype=model.W.dtype, device=model.W.device)
    v = model.b + sigma * torch.randn(
        (n_chains, model.v_dim), generator=generator, device=model.W.device, dtype=model.W.dtype
    )
    log_w = torch.zeros(n_chains, device=v.device, dtype=v.dtype)
    for previous, beta in zip(betas[:-1], betas[1:], strict=True):
        logits = model.hidden_logits(v)
        log_w += (F.softplus(beta * logits) - F.softplus(previous * logits)).sum(-1)
        probs = torch.sigmoid(beta * logits)
        h = (torch.rand(probs.shape, generator=generator, device=v.device, dtype=v.dtype) < probs).to(v.dtype)
        noise = torch.randn(v.shape, generator=generator, device=v.device, dtype=v.dtype)
        v = model.b + model.variance * beta * (h @ model.W.T) + sigma * noise
    log_z0 = model.log_sigma.sum() + 0.5 * model.v_dim * math.log(2 * math.pi) + model.h_dim * math.log(2)
    log_mean_w = torch.logsumexp(log_w, 0) - math.log(n_chains)
    weights = torch.exp(log_w - log_w.max())
    stderr = weights.std() / (weights.mean() * math.sqrt(n_chains))
    return LogPartition(float(log_mean_w + log_z0), float(stderr), "ais")


def log_partition(
    model: GRBM,
    exact_max_h_dim: int = 20,
    ais_temperatures: int = 1000,
    ais_chains: int = 500,
    generator: torch.Generator | None = None,
) -> LogPartition:
    """Exact ``log Z`` when ``h_dim <= exact_max_h_dim`` (2^m states), AIS otherwise."""
    if model.h_dim <= exact_max_h_dim:
        with torch.no_grad():
            return LogPartition(float(model.log_partition()), 0.0, "exact")
    return ais_log_partition(model, ais_temperatures, ais_chains, generator)


def log_likelihood(model: GRBM, v: torch.Tensor, log_z: LogPartition) -> torch.Tensor:
    """Mean log-likelihood in nats per point: ``mean(−F(v)) − log Z``."""
    with torch.no_grad():
        return (-model.free_energy(v)).mean() - log_z.value
