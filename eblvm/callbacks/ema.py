"""Exponential moving average of a module's parameters, leaving its buffers (objective state) alone."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EMAWeightAveraging


class ParameterEMA(EMAWeightAveraging):
    """Lightning's EMA callback, averaging parameters only: ``θ_ema ← decay θ_ema + (1 − decay) θ`` each step.

    Buffers are state, not weights: PCD's persistent chains grow from empty and must never be averaged or swapped
    out. Lightning's callback swaps and checkpoints buffers from its stale copy even with ``use_buffers=False``;
    here validation and the final weights exchange parameters only, and a checkpoint's ``state_dict`` carries the
    averaged parameters with the live buffers.
    """

    def __init__(self, decay: float):
        super().__init__(decay=decay, use_buffers=False)

    def _parameter_pairs(self, pl_module: pl.LightningModule):
        return zip(self._average_model.module.parameters(), pl_module.parameters(), strict=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        """The averaged copy mirrors the live buffers; a buffer that changed shape (chains created on the first
        step) is re-allocated first, since the mirroring copies in place."""
        if self._average_model is not None:
            for mirror, live in zip(self._average_model.module.buffers(), pl_module.buffers(), strict=True):
                if mirror.shape != live.shape:
                    mirror.data = live.detach().clone().to(mirror.device)
        super().on_train_batch_end(trainer, pl_module, *args)

    def _swap_models(self, pl_module: pl.LightningModule) -> None:
        for average, current in self._parameter_pairs(pl_module):
            held = average.data.clone()
            average.data.copy_(current.data)
            current.data.copy_(held)

    def _copy_average_to_current(self, pl_module: pl.LightningModule) -> None:
        for average, current in self._parameter_pairs(pl_module):
            current.data.copy_(average.data)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]):
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if "current_model_state" in checkpoint:
            live = checkpoint["current_model_state"]
            for name, _ in pl_module.named_buffers():
                if name in live:
                    checkpoint["state_dict"][name] = live[name]
