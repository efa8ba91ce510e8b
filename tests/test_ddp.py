"""Per-rank state across DDP processes and skipped iterations: what a checkpoint keeps and what a skip restores."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from eblvm.checkpoints import load_checkpoint, own_rank_state
from eblvm.run import _lightning_callbacks, run
from tests.conftest import FAST_RUN, checkpoint_every, compose_train_config, saved_at

DDP = ["trainer=ddp_cpu"]


class IterationRecorder(pl.Callback):
    """Keeps q's weights, both optimizers' and both schedulers' states and the energy's weights before and after
    every iteration that did not advance the global step (a skipped one)."""

    def __init__(self):
        self.skipped: list[tuple[dict, dict]] = []
        self._before: tuple[int, dict] | None = None

    @staticmethod
    def _state(trainer, module) -> dict:
        return copy.deepcopy(
            {
                "model": module.model.state_dict(),
                "posterior": module.posterior.state_dict(),
                "optimizers": [optimizer.state_dict() for optimizer in trainer.optimizers],
                "schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
            }
        )

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._before = (trainer.global_step, self._state(trainer, module))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step, before = self._before
        if trainer.global_step == step:
            self.skipped.append((before, self._state(trainer, module)))


def _assert_same(before, after, path="state"):
    if isinstance(before, torch.Tensor):
        assert torch.equal(before, after), path
    elif isinstance(before, dict):
        assert before.keys() == after.keys(), path
        for key in before:
            _assert_same(before[key], after[key], f"{path}.{key}")
    elif isinstance(before, list | tuple):
        assert len(before) == len(after), path
        for index, (a, b) in enumerate(zip(before, after, strict=True)):
            _assert_same(a, b, f"{path}[{index}]")
    else:
        assert before == after, f"{path}: {before!r} != {after!r}"


def test_a_skipped_iteration_leaves_q_both_optimizers_and_both_schedulers_as_they_were(tmp_path, monkeypatch):
    """BiSM's lower level has taken its K steps when the higher loss turns NaN: skipping must undo them."""
    recorder = IterationRecorder()
    monkeypatch.setattr("eblvm.run._lightning_callbacks", _with(recorder))
    overrides = [
        "objective._target_=tests.nan_objective.NaNAtSteps",
        "+objective.nan_steps=[3,4]",
        "on_nonfinite=skip",
        "optim.scheduler=cosine",
    ]
    run(compose_train_config(tmp_path, FAST_RUN + overrides))
    assert len(recorder.skipped) == 2
    for before, after in recorder.skipped:
        _assert_same(before, after)


def _with(extra: pl.Callback):
    """``eblvm.run._lightning_callbacks`` with ``extra`` appended (a callback object the config cannot name)."""
    return lambda cfg: [*_lightning_callbacks(cfg), extra]


@pytest.mark.slow
def test_ddp_checkpoint_keeps_every_ranks_persistent_chains(tmp_path):
    run(compose_train_config(tmp_path, FAST_RUN + DDP + ["objective=pcd", "trainer.max_steps=10"]))
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    chains = checkpoint["eblvm_rank_buffers"]["objective.chain"]
    assert chains.shape == (2, 100, 4), "one (batch, h_dim) chain per rank"
    assert not torch.equal(chains[0], chains[1]), "each rank runs its own chain"
    torch.testing.assert_close(checkpoint["state_dict"]["objective.chain"], chains[0], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["pcd", "vages"])
def test_ddp_interrupt_and_resume_equals_the_uninterrupted_run(tmp_path, objective):
    """Two CPU processes, PCD (per-rank chains, noise generators and data order) and VaGES (per-rank particles, q
    trained on each rank's batch): resumed from the checkpoint at step 20 of a 40-step run, a run ends where the
    40 steps in one go end."""
    common = FAST_RUN + DDP + [f"objective={objective}", "trainer.val_check_interval=10", "test_checkpoint=last"]
    run(compose_train_config(tmp_path / "whole", common + checkpoint_every(20, tmp_path) + ["trainer.max_steps=40"]))
    resumed = [f"ckpt_path={saved_at(20, tmp_path)}", "trainer.max_steps=40"]
    run(compose_train_config(tmp_path / "split", common + resumed))
    whole = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.ckpt")
    assert whole["global_step"] == split["global_step"] == 40
    _assert_same(whole["state_dict"], split["state_dict"])
    _assert_same(whole["eblvm_rank_buffers"], split["eblvm_rank_buffers"])
    _assert_same(whole["optimizer_states"], split["optimizer_states"])


def test_a_ranks_saved_generator_state_restores_its_stream():
    """Rank 1's row of the stacked states starts inside another row's storage; torch's Generator.set_state crashed
    on such a view (a segmentation fault on resuming rank 1 of a DDP run)."""
    generators = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    stacked = torch.stack([generator.get_state() for generator in generators])
    expected = torch.rand(5, generator=generators[1])
    restored = torch.Generator()
    restored.set_state(own_rank_state(SimpleNamespace(global_rank=1, world_size=2), stacked))
    assert torch.equal(torch.rand(5, generator=restored), expected)
