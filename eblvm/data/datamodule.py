"""The LightningDataModule every dataset goes through: batches are plain (B, d) float32 tensors, (S, B, d) for an
ensemble of S members."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchdata.stateful_dataloader import Stateful, StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler, StatefulDistributedSampler

from eblvm.checkpoints import gather_rank_states, own_rank_state
from eblvm.data.splits import Splits
from eblvm.errors import require, require_choice, require_count

SHUFFLE_STREAM = 1 << 20  # keeps the shuffling generator apart from the others seeded from the run's seed
# The pixel scales image data can be trained on: every image dataset is read in [0, 1]; "symmetric" maps it to
# [-1, 1] (the BiDVL networks' tanh scale).
PIXEL_RANGES = ("unit", "symmetric")


class Rows(Dataset):
    """The rows of one (N, d) tensor; a batch is fetched by one indexing operation (``__getitems__``), not row by
    row and stacked, in the order the loader's sampler gives: a list of B indices gives a ``(B, d)`` batch, an
    ensemble's ``(S, B)`` index tensor (``MemberBatches``) an ``(S, B, d)`` one."""

    def __init__(self, data: torch.Tensor):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data[index]

    def __getitems__(self, indices: list[int] | torch.Tensor) -> torch.Tensor:
        return self.data[indices]


class MemberBatches(Sampler[torch.Tensor]):
    """The batches of an ensemble's members, each shuffled by a generator of its own: batch ``t`` is an ``(S, B)``
    index tensor whose row ``k`` is member ``k``'s batch ``t`` as the run with that member's seed alone draws it
    (torchdata's ``RandomSampler`` and ``BatchSampler``: one ``torch.randperm`` of the rows per epoch from the
    shuffling generator, cut into batches of ``batch_size``, a last partial batch dropped when ``drop_last``). Its
    iterator keeps the generators' states at the epoch's start and its position, so a resumed ensemble sees the
    same batches."""

    def __init__(self, n_rows: int, batch_size: int, drop_last: bool, generators: list[torch.Generator]):
        self.n_rows, self.batch_size, self.drop_last, self.generators = n_rows, batch_size, drop_last, generators

    def __iter__(self):
        return _MemberBatchesIterator(self)

    def __len__(self) -> int:
        return self.n_rows // self.batch_size if self.drop_last else math.ceil(self.n_rows / self.batch_size)


class _MemberBatchesIterator(Iterator[torch.Tensor], Stateful):
    def __init__(self, sampler: MemberBatches):
        self.sampler = sampler
        self.yielded = 0
        self._shuffle()

    def _shuffle(self) -> None:
        """The epoch's permutations, one row per member, and the generators' states they were drawn from."""
        generators = self.sampler.generators
        self.generator_states = [generator.get_state() for generator in generators]
        self.order = torch.stack([torch.randperm(self.sampler.n_rows, generator=g) for g in generators])

    def __next__(self) -> torch.Tensor:
        if self.yielded == len(self.sampler):
            raise StopIteration
        start = self.yielded * self.sampler.batch_size
        self.yielded += 1
        return self.order[:, start : start + self.sampler.batch_size]

    def state_dict(self) -> dict[str, Any]:
        return {"generator_states": self.generator_states, "yielded": self.yielded}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "members" in state_dict:  # written before the batches were index tensors: one torchdata state per member
            members = state_dict["members"]
            state_dict = {
                "generator_states": [member["sampler_iter_state"]["generator"] for member in members],
                "yielded": math.ceil(members[0]["samples_yielded"] / self.sampler.batch_size),  # a partial one too
            }
        for generator, state in zip(self.sampler.generators, state_dict["generator_states"], strict=True):
            generator.set_state(state)
        self._shuffle()
        self.yielded = state_dict["yielded"]


def shuffle_generator(seed: int) -> torch.Generator:
    """The generator that shuffles the training rows of the run seeded ``seed`` (a stream of its own)."""
    state = np.random.SeedSequence([seed, SHUFFLE_STREAM]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _batch(rows: torch.Tensor) -> torch.Tensor:
    """The batch ``Rows.__getitems__`` fetched ((B, d), or an ensemble's (S, B, d)), as it is."""
    return rows


def _symmetric(splits: Splits) -> Splits:
    """``splits`` with every split's rows mapped from [0, 1] to [−1, 1]."""
    return dataclasses.replace(splits, train=2 * splits.train - 1, val=2 * splits.val - 1, test=2 * splits.test - 1)


def _channels_height_width(image_shape: Sequence[int], dim: int) -> tuple[int, int, int]:
    """``image_shape`` given as (height, width) or (channels, height, width), as (channels, height, width)."""
    shape = tuple(image_shape)
    require(
        len(shape) in (2, 3) and all(isinstance(size, int) and size >= 1 for size in shape) and math.prod(shape) == dim,
        "image_shape",
        list(shape),
        f"must be (height, width) or (channels, height, width) with a product equal to the data dimension {dim}",
    )
    return (1, *shape) if len(shape) == 2 else shape


def _lightning_seed() -> int:
    """The run's seed as Lightning recorded it (``PL_GLOBAL_SEED``), else torch's initial seed."""
    return int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))


class ResumableDistributedSampler(StatefulDistributedSampler):
    """torchdata's ``StatefulDistributedSampler`` (which keeps the position within an epoch) with the epoch in its
    state too: a resumed DDP run restores its loader before Lightning sets the epoch, and without it the rest of the
    interrupted epoch would be drawn from epoch 0's permutation."""

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.set_epoch(state_dict["epoch"])


def flip_horizontally(batch: torch.Tensor, image_shape: tuple[int, int, int], flip: torch.Tensor) -> torch.Tensor:
    """The rows of ``batch`` (images flattened in C, H, W order) mirrored along their width where ``flip`` is True."""
    images = batch.reshape(len(batch), *image_shape)
    flipped = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    return flipped.reshape(batch.shape)


class EBLVMDataModule(pl.LightningDataModule):
    """Data loaders over fixed ``Splits``.

    Training batches are shuffled and, when the training set has at least ``batch_size`` rows, all full.
    ``train_on_val`` trains on train and val together (the BiSM toy protocol); validation still uses val.
    ``image_shape`` marks image data, given as (height, width) for one channel or (channels, height, width), and
    is kept as ``self.image_shape = (C, H, W)``. ``random_flip`` mirrors a random half of every training batch
    along the image width (validation and test batches are never flipped); each process draws its flips from its
    own generator, seeded from the Lightning seed (``PL_GLOBAL_SEED``, else torch's initial seed) and its rank.

    ``pixel_range="symmetric"`` trains on images mapped from [0, 1] to [−1, 1] (``2x − 1``, every split);
    ``to_unit`` maps rows of the training scale back to [0, 1] for grids and FID, and ``from_unit`` the other way.

    Resuming is exact: the training loader is a ``StatefulDataLoader`` whose position and shuffling state
    Lightning saves in checkpoints, and every rank's flip generator is saved beside it.
    """

    def __init__(
        self,
        splits: Splits,
        batch_size: int = 100,
        eval_batch_size: int = 1000,
        train_on_val: bool = False,
        num_workers: int = 0,
        image_shape: Sequence[int] | None = None,
        random_flip: bool = False,
        pixel_range: str = "unit",
    ):
        super().__init__()
        require(isinstance(splits, Splits), "splits", type(splits).__name__, "must be an eblvm.data.Splits")
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            require_count(key, value, 1)
        require_count("num_workers", num_workers, 0)
        require_choice("pixel_range", pixel_range, PIXEL_RANGES)
        require(
            pixel_range == "unit" or image_shape is not None,
            "pixel_range",
            pixel_range,
            "rescales images, so it needs data.image_shape=[channels, height, width]",
        )
        require(
            not random_flip or image_shape is not None,
            "random_flip",
            random_flip,
            "flips images, so it needs data.image_shape=[channels, height, width]",
        )
        self.pixel_range = pixel_range
        self.splits = splits if pixel_range == "unit" else _symmetric(splits)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.train_on_val = train_on_val
        self.num_workers = num_workers
        self.image_shape = None if image_shape is None else _channels_height_width(image_shape, splits.dim)
        self.random_flip = random_flip
        self.train_data = torch.cat([self.splits.train, self.splits.val]) if train_on_val else self.splits.train
        self._flip_generator: torch.Generator | None = None
        self.shuffle_seeds: list[int] | None = None  # an ensemble's member seeds (``train_dataloader``)

    def to_unit(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the training scale mapped to [0, 1] pixels (the identity for ``pixel_range="unit"``)."""
        return rows if self.pixel_range == "unit" else (rows + 1) / 2

    def from_unit(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of [0, 1] pixels mapped to the training scale (the inverse of ``to_unit``)."""
        return rows if self.pixel_range == "unit" else 2 * rows - 1

    @property
    def dim(self) -> int:
        """The data dimension ``d``."""
        return self.splits.dim

    def labels(self, split: str) -> torch.Tensor | None:
        """The class labels of the rows a loader of ``split`` (train, val or test) iterates over, None if unlabelled.

        ``labels("train")`` matches ``train_data``: with ``train_on_val`` it is the train labels followed by the
        val labels.
        """
        labels = self.splits.labels(split)
        if split == "train" and self.train_on_val and labels is not None:
            return torch.cat([labels, self.splits.val_labels])
        return labels

    def _loader(self, rows: Rows, **batching: Any) -> DataLoader:
        """A resumable loader over ``rows`` with this module's collation and workers; ``batching`` says how rows
        are batched (``batch_size`` with a ``sampler`` or ``shuffle=False``, or a ``batch_sampler``)."""
        return StatefulDataLoader(
            rows,
            collate_fn=_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **batching,
        )

    def batches_per_epoch(self, world_size: int = 1) -> int:
        """The training batches each process draws in one epoch (``train_dataloader``'s length)."""
        rows = len(self.train_data) // world_size if world_size > 1 else len(self.train_data)
        return max(rows // self.batch_size, 1)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, from a generator seeded with the run's seed (``shuffle_generator``); under
        DDP each rank takes its share of one permutation per epoch. The sampler's state (position, generator,
        epoch) is in checkpoints, so a resumed run sees the same batches. With ``shuffle_seeds`` (an ensemble's
        member seeds) a batch is ``(S, B, d)``: each member's batch, shuffled as its seed alone would."""
        drop_last = len(self.train_data) >= self.batch_size
        world_size = self.trainer.world_size if self.trainer is not None else 1
        rows = Rows(self.train_data)
        if self.shuffle_seeds is not None:
            require(world_size == 1, "trainer.devices", world_size, "an ensemble trains in one process: use 1")
            generators = [shuffle_generator(seed) for seed in self.shuffle_seeds]
            batches = MemberBatches(len(rows), self.batch_size, drop_last, generators)
            return self._loader(rows, batch_sampler=batches)
        if world_size > 1:
            sampler = ResumableDistributedSampler(
                rows, num_replicas=world_size, rank=self.trainer.global_rank, seed=_lightning_seed(), drop_last=True
            )
        else:
            sampler = RandomSampler(rows, generator=shuffle_generator(_lightning_seed()))
        return self._loader(rows, batch_size=self.batch_size, sampler=sampler, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(Rows(self.splits.val), batch_size=self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(Rows(self.splits.test), batch_size=self.eval_batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``random_flip``, mirror each image of a training batch with probability 1/2."""
        if self.random_flip and self.trainer is not None and self.trainer.training:
            flip = torch.rand(len(batch), generator=self._generator()) < 0.5
            batch = flip_horizontally(batch, self.image_shape, flip.to(batch.device))
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Every rank's flip generator state (Lightning calls this on all ranks when it builds a checkpoint)."""
        if not self.random_flip:
            return {}
        return {"flip_generator_states": gather_rank_states(self.trainer, self._generator().get_state())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        own = own_rank_state(self.trainer, state_dict.get("flip_generator_states"))
        if own is not None:
            self._generator().set_state(own)

    def _generator(self) -> torch.Generator:
        """This process's flip generator, created on first use from the Lightning seed and the global rank."""
        if self._flip_generator is None:
            seed = _lightning_seed()
            rank = self.trainer.global_rank if self.trainer is not None else 0
            # Hashing (seed, rank) keeps this stream apart from generators seeded with seed + rank directly.
            state = np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0]
            self._flip_generator = torch.Generator().manual_seed(int(state))
        return self._flip_generator
