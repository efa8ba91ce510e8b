"""Train/validation/test splits of a data matrix, and the checks every dataset goes through."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from eblvm.errors import require, require_count

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Splits:
    """Three non-empty float32 matrices of shape (N, d) with the same ``d`` and only finite values.

    Labelled data also carry the class of every row: ``train_labels``, ``val_labels`` and ``test_labels`` are
    1-D int64 tensors with one entry per row of their split, given for all three splits or for none.
    """

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in SPLIT_NAMES:
            split = getattr(self, name)
            if not isinstance(split, torch.Tensor) or split.ndim != 2 or not split.is_floating_point():
                raise ValueError(f"Splits.{name} must be a 2-D float tensor, got {_describe(split)}")
            if len(split) == 0:
                raise ValueError(f"Splits.{name} is empty")
            if split.shape[1] != self.train.shape[1]:
                raise ValueError(f"Splits.{name} has {split.shape[1]} columns, train {self.train.shape[1]}")
            if not torch.isfinite(split).all():
                raise ValueError(f"Splits.{name} contains NaN or infinite values")
        labelled = [name for name in SPLIT_NAMES if self.labels(name) is not None]
        if labelled and len(labelled) != len(SPLIT_NAMES):
            raise ValueError(
                f"Splits has labels for {', '.join(labelled)} only; give them for all three splits or none"
            )
        for name in labelled:
            labels = self.labels(name)
            if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.dtype != torch.int64:
                raise ValueError(f"Splits.{name}_labels must be a 1-D int64 tensor, got {_describe(labels)}")
            rows = len(getattr(self, name))
            if len(labels) != rows:
                raise ValueError(f"Splits.{name}_labels has {len(labels)} labels for the {rows} rows of Splits.{name}")

    @property
    def dim(self) -> int:
        """The data dimension ``d``."""
        return self.train.shape[1]

    def labels(self, split: str) -> torch.Tensor | None:
        """The labels of ``split`` (``"train"``, ``"val"`` or ``"test"``), or None for unlabelled data."""
        if split not in SPLIT_NAMES:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, f"{split}_labels")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor | np.ndarray):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


def as_data_matrix(array: np.ndarray | torch.Tensor, source: str) -> torch.Tensor:
    """``array`` as a finite float32 tensor of shape (N, d); a 1-D array becomes (N, 1).

    ``source`` (a file path, a dataset name) starts every error message.
    """
    data = torch.as_tensor(array).to(torch.float32)
    if data.ndim == 1:
        data = data.unsqueeze(1)
    if data.ndim != 2:
        raise ValueError(
            f"{source}: array of shape {tuple(data.shape)}, expected (N, d); "
            "flatten each example into one row first, e.g. x.reshape(len(x), -1)"
        )
    bad = int((~torch.isfinite(data)).sum())
    if bad:
        raise ValueError(f"{source}: {bad} NaN or infinite values; clean or drop those rows first")
    return data


def require_sizes(**sizes: int) -> int:
    """Check that each named split size (``n_train=...``) is an integer >= 1 and return their total."""
    for key, value in sizes.items():
        require_count(f"splits.{key}", value, 1)
    return sum(sizes.values())


def split_rows(data: torch.Tensor, n_train: int, n_val: int, labels: torch.Tensor | None = None) -> Splits:
    """The first ``n_train`` rows, the next ``n_val``, and the rest, each with its ``labels`` if given."""
    cuts = (slice(None, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None))
    label_parts = [None if labels is None else labels[cut] for cut in cuts]
    return Splits(*(data[cut] for cut in cuts), *label_parts)


def _random_order(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def shuffle_rows(data: torch.Tensor, seed: int) -> torch.Tensor:
    """``data`` with its rows in a random order fixed by ``seed``."""
    return data[_random_order(len(data), seed)]


def split_by_fractions(
    data: torch.Tensor,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    labels: torch.Tensor | None = None,
) -> Splits:
    """Shuffle the rows of ``data`` (and their ``labels``) with ``seed`` and hold out the given fractions of them.

    Held-out sizes are rounded to the nearest row; every split must end up with at least one row.
    """
    fractions = {"val_fraction": val_fraction, "test_fraction": test_fraction}
    for key, value in fractions.items():
        require(0 <= value < 1, f"splits.{key}", value, "must be in [0, 1)")
    require(
        val_fraction + test_fraction < 1,
        "splits.val_fraction",
        val_fraction,
        f"val_fraction + test_fraction must be < 1 (test_fraction={test_fraction})",
    )
    n = len(data)
    sizes = {key: round(value * n) for key, value in fractions.items()}
    for key, size in sizes.items():
        require(size >= 1, f"splits.{key}", fractions[key], f"gives {size} of {n} rows; need >= 1")
    n_train = n - sum(sizes.values())
    require(n_train >= 1, "splits.val_fraction", val_fraction, f"leaves none of the {n} rows for training")
    order = _random_order(n, seed)
    return split_rows(data[order], n_train, sizes["val_fraction"], None if labels is None else labels[order])
