"""Shared by the benchmarks: per-batch wall-clock timing inside Lightning, and peak memory."""

from __future__ import annotations

import resource
import time

import pytorch_lightning as pl
import torch


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class BatchTimer(pl.Callback):
    """Seconds of every training batch (the whole bi-level iteration), GPU work included."""

    def __init__(self, device: str):
        self.device = device
        self.durations: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        synchronize(self.device)
        self.durations.append(time.perf_counter() - self._start)


def max_rss_mb() -> float:
    """This process's peak resident memory so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb(device: str, cpu_baseline_mb: float) -> float:
    """Peak GPU memory allocated, or on CPU the growth of the peak RSS above ``cpu_baseline_mb``."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return max_rss_mb() - cpu_baseline_mb


def quiet_trainer(device: str, max_steps: int, callbacks: list, **kwargs) -> pl.Trainer:
    """A Trainer with no validation, logging, checkpoints or progress bar: only the timed training loop."""
    return pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        max_steps=max_steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )
