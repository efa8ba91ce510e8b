"""A callback that records, on every DDP rank, what the DDP test compares across ranks."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch


class RankProbe(pl.Callback):
    """Writes ``rank<k>.pt`` with the rank's initial and final state, global step, noise seed and first batch."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.first_batch: torch.Tensor | None = None
        self.initial_state: dict[str, torch.Tensor] | None = None

    def on_train_start(self, trainer, module):
        self.initial_state = {name: value.detach().clone() for name, value in module.state_dict().items()}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.first_batch is None:
            self.first_batch = batch.detach().clone()

    def on_train_end(self, trainer, module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "parameters": torch.cat([p.detach().flatten() for p in module.parameters()]),
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "seed": module.generator.initial_seed(),
            "first_batch": self.first_batch,
            "initial_state": self.initial_state,
            "final_state": {name: value.detach().clone() for name, value in module.state_dict().items()},
        }
        torch.save(record, self.out_dir / f"rank{trainer.global_rank}.pt")
