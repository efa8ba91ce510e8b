"""CD, PCD, NCE and VNCE against exact GRBM quantities."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from eblvm.bilevel.module import BilevelModule
from eblvm.bilevel.optim import OptimConfig
from eblvm.models import GRBM
from eblvm.objectives import ContrastiveDivergence, NoiseContrastiveEstimation, VariationalNCE
from eblvm.posteriors import BoundPosterior, RelaxedBernoulliPosterior
from eblvm.sampling import gibbs_sample
from tests.test_grbm import random_grbm


def test_pcd_chains_persist_across_steps_and_survive_a_state_dict_round_trip(float64):
    model = random_grbm(2, 3, seed=31)
    pcd = ContrastiveDivergence(k=1, persistent=True)
    generator = torch.Generator().manual_seed(0)
    pcd.higher_loss(model, None, torch.rand(8, 2), generator)
    first = pcd.chain.clone()
    assert first.shape == (8, 3)
    pcd.validation_loss(model, None, torch.rand(8, 2), generator)
    assert torch.equal(pcd.chain, first), "validation must not move the persistent chains"
    pcd.higher_loss(model, None, torch.rand(8, 2), generator)
    assert not torch.equal(pcd.chain, first)

    restored = ContrastiveDivergence(k=1, persistent=True)
    restored.load_state_dict(pcd.state_dict())
    assert torch.equal(restored.chain, pcd.chain)
    assert not ContrastiveDivergence(k=1).state_dict()["chain"].numel()


def _train_on_known_grbm(objective, posterior, steps: int):
    """Data from a known 2->3 GRBM; a fresh GRBM learns it with ``objective`` through the real module."""
    torch.manual_seed(0)
    truth = random_grbm(2, 3, seed=32, scale=2.0).requires_grad_(False)
    data = gibbs_sample(truth, 4000, n_sweeps=200, generator=torch.Generator().manual_seed(1), return_mean=False)
    objective.prepare(data)
    model = GRBM(2, 3)
    module = BilevelModule(model, posterior, objective, OptimConfig(lr=1e-2), seed=0)
    held_out = data[:1000]

    def loss_and_gap():
        q = None if module.posterior is None else BoundPosterior.detached(module.posterior)
        loss = objective.validation_loss(model, q, held_out, torch.Generator().manual_seed(2))
        return loss.item(), abs(objective.log_normalizer.item() - model.log_partition().item())

    before = loss_and_gap()
    trainer = pl.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=200, shuffle=True, drop_last=True))
    return before, loss_and_gap()


def test_nce_lowers_its_loss_and_learns_log_z():
    (loss_before, gap_before), (loss_after, gap_after) = _train_on_known_grbm(NoiseContrastiveEstimation(), None, 600)
    assert loss_after < loss_before - 0.05
    assert gap_after < 0.05 < gap_before


def test_vnce_lowers_its_loss_and_learns_log_z():
    posterior = RelaxedBernoulliPosterior(2, 3)
    (loss_before, gap_before), (loss_after, gap_after) = _train_on_known_grbm(VariationalNCE(), posterior, 600)
    assert loss_after < loss_before - 0.05
    assert gap_after < 0.1 < gap_before
