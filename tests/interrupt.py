"""A callback that signals its own process at a chosen step, standing in for a cluster's preemption notice."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class SignalAtStep(pl.Callback):
    """Sends ``signal_name`` to this process once the global step reaches ``step``."""

    def __init__(self, step: int, signal_name: str = "SIGUSR1"):
        self.step, self.signal = step, signal.Signals[signal_name]

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)
