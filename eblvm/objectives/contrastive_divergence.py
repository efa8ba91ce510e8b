"""Contrastive divergence (CD-k) and its persistent variant (PCD-k) for GRBMs."""

from __future__ import annotations

import torch

from eblvm.errors import require_count
from eblvm.members import batch_mean
from eblvm.models.base import EnergyModel
from eblvm.objectives.base import Objective, require_gibbs_sampler


class ContrastiveDivergence(Objective):
    """CD-k: ``loss = mean F(v) − mean F(v_k)`` with ``v_k`` the end of a k-step Gibbs chain, detached.

    The chain starts at ``h₀ ~ p(h|v)`` of the batch and runs ``v' ~ p(v|h)``, ``h ~ p(h|v')`` k times. Only the
    gradient means something: it is the CD approximation of the log-likelihood gradient. With
    ``persistent=True`` (PCD-k) the chain's ``h`` carries over between iterations, initialised once from
    ``h ~ p(h|v)`` of the first batch; it is a buffer, so checkpoints keep it.
    """

    per_rank_buffers = ("chain",)

    def __init__(self, k: int = 1, persistent: bool = False):
        super().__init__()
        require_count("k", k, 1)
        self.k, self.persistent = k, persistent
        self.register_buffer("chain", torch.empty(0))

    def check_model(self, model, latent_type) -> None:
        require_gibbs_sampler(model, "pcd" if self.persistent else "cd")

    @torch.no_grad()
    def _negative_samples(self, model: EnergyModel, hidden: torch.Tensor, generator: torch.Generator):
        for _ in range(self.k):
            visible = model.sample_visible(hidden, generator)
            hidden = model.sample_hidden(visible, generator)
        return visible, hidden

    def _loss(self, model: EnergyModel, v: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        return batch_mean(model.free_energy(v), v) - batch_mean(model.free_energy(negatives), v)

    def higher_loss(self, model: EnergyModel, q, v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        start = self.chain if self.persistent and self.chain.numel() else model.sample_hidden(v.detach(), generator)
        negatives, end = self._negative_samples(model, start, generator)
        if self.persistent:
            self.chain = end
        return self._loss(model, v, negatives)

    def validation_loss(self, model: EnergyModel, q, v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        negatives, _ = self._negative_samples(model, model.sample_hidden(v, generator), generator)
        return self._loss(model, v, negatives)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "chain")
        if saved is not None:  # the chain's size is only known once it exists
            self.chain = torch.empty_like(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
