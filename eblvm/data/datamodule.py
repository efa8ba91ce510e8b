"""The LightningDataModule every dataset goes through: batches are plain (B, d) float32 tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from eblvm.data.splits import Splits
from eblvm.errors import require


def _stack_rows(rows: list[tuple[torch.Tensor]]) -> torch.Tensor:
    """Collate ``TensorDataset`` items into one (B, d) tensor rather than a 1-tuple."""
    return torch.stack([row for (row,) in rows])


class EBLVMDataModule(pl.LightningDataModule):
    """Data loaders over fixed ``Splits``.

    Training batches are shuffled and, when the training set has at least ``batch_size`` rows, all full.
    ``train_on_val`` trains on train and val together (the BiSM toy protocol); validation still uses val.
    ``image_shape`` (height, width) marks image data, for drawing samples.
    """

    def __init__(
        self,
        splits: Splits,
        batch_size: int = 100,
        eval_batch_size: int = 1000,
        train_on_val: bool = False,
        num_workers: int = 0,
        image_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        require(isinstance(splits, Splits), "splits", type(splits).__name__, "must be an eblvm.data.Splits")
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            require(isinstance(value, int) and value >= 1, key, value, "must be an integer >= 1")
        require(isinstance(num_workers, int) and num_workers >= 0, "num_workers", num_workers, "must be >= 0")
        if image_shape is not None:
            image_shape = tuple(image_shape)
            require(
                len(image_shape) == 2 and math.prod(image_shape) == splits.dim,
                "image_shape",
                list(image_shape),
                f"must be (height, width) with height * width = the data dimension {splits.dim}",
            )
        self.splits = splits
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.train_on_val = train_on_val
        self.num_workers = num_workers
        self.image_shape = image_shape
        self.train_data = torch.cat([splits.train, splits.val]) if train_on_val else splits.train

    @property
    def dim(self) -> int:
        """The data dimension ``d``."""
        return self.splits.dim

    def _loader(self, data: torch.Tensor, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            TensorDataset(data),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            collate_fn=_stack_rows,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        drop_last = len(self.train_data) >= self.batch_size
        return self._loader(self.train_data, self.batch_size, shuffle=True, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits.val, self.eval_batch_size, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.splits.test, self.eval_batch_size, shuffle=False, drop_last=False)
