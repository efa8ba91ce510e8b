"""A CSV logger that appends to the run's ``metrics.csv`` instead of rewriting it from scratch.

Lightning's ``CSVLogger`` keeps the file's header in memory and deletes an existing ``metrics.csv`` when a new
writer is created. A writer that outlives the process that wrote the file (a ``trainer.test`` after a spawned
DDP ``fit``: the workers receive the parent's writer, whose header is empty) rewrites the file with only its
own columns and fails on the rows already there; a fresh writer over the run directory (a resumed run) loses the
earlier rows. Here a writer keeps the file and first reads the header on disk, so every row and column stays.
"""

from __future__ import annotations

import csv

import pytorch_lightning as pl
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from eblvm.atomic import opened


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's metrics writer, with the columns of an existing ``metrics.csv`` taken as its header."""

    def _record_new_keys(self) -> set[str]:
        if not self.metrics_keys and self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])
        return super()._record_new_keys()

    def _check_log_dir_exists(self) -> None:
        """Keep an existing ``metrics.csv`` (Lightning deletes it here): new rows are appended to it."""

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        """A new column rewrites the whole file (Lightning truncates it first): written atomically here, so a run
        stopped mid-rewrite keeps its earlier rows."""
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = list(csv.DictReader(file))
        with opened(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)


class CSVLogger(pl.loggers.CSVLogger):
    """``pytorch_lightning.loggers.CSVLogger`` writing through :class:`AppendingExperimentWriter`."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
