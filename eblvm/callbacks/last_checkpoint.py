"""``checkpoints/last.ckpt`` at the run's final step and on a cluster's preemption signal."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint

from eblvm.errors import Preempted

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class LastCheckpoint(Checkpoint):
    """Writes ``checkpoint_path`` after the final training step, and on SIGTERM or SIGUSR1 after the current step
    (then raises ``Preempted``), so every run ends with its final state saved, however short.

    The checkpoint is taken where Lightning resumes exactly: after the step when no validation follows it, else
    after that validation (as a ``Checkpoint`` callback this runs after the other checkpoint callbacks, so
    ``best.ckpt`` already saw the validation). The signal handlers replace Lightning's own for the duration of
    training (Lightning's SIGTERM handling stops without a checkpoint) and are put back afterwards. Under DDP every
    rank checks, each step, whether any rank was signalled, so all ranks stop at the same step and write together.
    """

    def __init__(self, checkpoint_path: str | Path):
        self.checkpoint_path = Path(checkpoint_path)
        self._received: str | None = None
        self._pending: str | None = None  # "final" or "preempted": write after the validation due at this step
        self._previous_handlers: dict[int, object] = {}

    def _on_signal(self, signum: int, frame) -> None:
        self._received = signal.Signals(signum).name

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._received, self._pending = None, None
        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            self._previous_handlers = {sig: signal.signal(sig, self._on_signal) for sig in PREEMPTION_SIGNALS}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        preempted = trainer.strategy.reduce_boolean_decision(self._received is not None, all=False)
        final = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if not (preempted or final):
            return
        epoch_loop = trainer.fit_loop.epoch_loop
        reason = "preempted" if preempted else "final"
        if epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):  # Lightning's own test, same pin
            self._pending = reason
        else:
            self._write(trainer, reason)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None and not trainer.sanity_checking:
            self._write(trainer, self._pending)

    def _write(self, trainer: pl.Trainer, reason: str) -> None:
        self._pending = None
        trainer.save_checkpoint(self.checkpoint_path)
        if reason == "preempted":
            raise Preempted(trainer.global_step, self._received or "a signal on another rank")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}
