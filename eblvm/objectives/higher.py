"""Score-matching losses, each a function of a score estimator (exact or BiSM) and a batch.

All return the batch mean; with per-particle scores ``(L, B, d)`` the per-particle losses are averaged too.
"""

from __future__ import annotations

import torch

from eblvm.objectives.scores import ScoreFn


def _with_grad(v: torch.Tensor) -> torch.Tensor:
    return v if v.requires_grad else v.detach().requires_grad_(True)


def denoising_score_matching(score_fn: ScoreFn, v: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor):
    """DSM (BiDSM with the BiSM estimator): ``½‖s(ṽ) + ε/σ‖²`` with ``ṽ = v + σε``.

    ``sigma`` broadcasts against ``v`` (a scalar or one level per row, shape ``(B, 1)``).
    """
    score = score_fn(_with_grad(v + sigma * eps))
    return 0.5 * ((score + eps / sigma) ** 2).sum(-1).mean()


def multiscale_denoising_score_matching(
    score_fn: ScoreFn, v: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, sigma0: float
) -> torch.Tensor:
    """MDSM (Li, Chen & Sommer 2019): ``½‖s(ṽ_i)/σ_i + ε_i/σ0²‖²`` with ``ṽ_i = v_i + σ_i ε_i``, ``σ`` (B, 1)."""
    score = score_fn(_with_grad(v + sigma * eps))
    return 0.5 * ((score / sigma + eps / sigma0**2) ** 2).sum(-1).mean()


def _input_gradient(total: torch.Tensor, v: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """``∇_v total`` divided by the number of particles in ``score``: the gradient of a particle mean."""
    (grad,) = torch.autograd.grad(total, v, create_graph=True)
    return grad / (score.numel() // v.numel())


def sliced_score_matching(score_fn: ScoreFn, v: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """SSM (Song et al. 2019) on clean data, one projection ``u``: ``½‖s(v)‖² + uᵀ∇_v(uᵀ s(v))``."""
    v = _with_grad(v)
    score = score_fn(v)
    trace_estimate = (probe * _input_gradient((probe * score).sum(), v, score)).sum(-1)
    return 0.5 * (score**2).sum(-1).mean() + trace_estimate.mean()


def score_matching(score_fn: ScoreFn, v: torch.Tensor) -> torch.Tensor:
    """Hyvärinen's SM with the exact Hessian trace: ``½‖s(v)‖² + Σ_i ∂s_i(v)/∂v_i``.

    One backward pass per dimension: for low dimensions. With the exact score this is the Fisher divergence to
    the data minus a data constant (the "SM objective" metric; lower is better, it can be negative).
    """
    v = _with_grad(v)
    score = score_fn(v)
    trace = sum(_input_gradient(score[..., i].sum(), v, score)[..., i] for i in range(v.shape[-1]))
    return 0.5 * (score**2).sum(-1).mean() + trace.mean()
