"""Datasets read from local files: Frey Face, and a user's own array (.npy, .npz, .pt or .csv)."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import torch
from hydra.utils import to_absolute_path
from scipy.io import loadmat

from eblvm.data.splits import (
    Splits,
    as_data_matrix,
    require_sizes,
    shuffle_rows,
    split_by_fractions,
    split_rows,
)
from eblvm.errors import require

FREYFACE_URL = "https://cs.nyu.edu/~roweis/data/frey_rawface.mat"
FREYFACE_PIXELS = 28 * 20


def resolve_path(path: str | os.PathLike) -> Path:
    """``path`` as an absolute path; a relative one is taken from the directory the run was started in.

    Inside a Hydra app that is the original working directory, not Hydra's run directory; outside one it is
    the current directory.
    """
    return Path(to_absolute_path(str(path)))


def freyface(path: str | os.PathLike, n_train: int = 1400, n_val: int = 300, seed: int = 0) -> Splits:
    """Frey Face (1965 faces of 28x20 pixels in [0, 1], d = 560) shuffled with ``seed``.

    Splits into ``n_train``, ``n_val`` and the rest (265 faces with the defaults).
    """
    file = resolve_path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"Frey Face data not found at {file}: download frey_rawface.mat from {FREYFACE_URL} and place it "
            f"at {file}, or set data.splits.path=/path/to/frey_rawface.mat"
        )
    contents = loadmat(file)
    faces = contents.get("ff")
    if faces is None or faces.ndim != 2 or faces.shape[0] != FREYFACE_PIXELS:
        found = (
            f"the variables {sorted(name for name in contents if not name.startswith('__'))}"
            if faces is None
            else f"'ff' of shape {faces.shape}"
        )
        raise ValueError(f"{file}: expected a variable 'ff' of shape ({FREYFACE_PIXELS}, N), found {found}")
    require_sizes(n_train=n_train, n_val=n_val)
    n = faces.shape[1]
    require(
        n_train + n_val < n,
        "splits.n_train",
        n_train,
        f"with n_val={n_val} must leave at least one of the {n} faces in {file} for the test split",
    )
    data = shuffle_rows(as_data_matrix(faces.T / 255.0, str(file)), seed)
    return split_rows(data, n_train, n_val)


def _choose(names: Collection[str], key: str | None, file: Path) -> str:
    """The array to read from a file holding several: ``key``, which may be left out if there is only one."""
    if key is None and len(names) == 1:
        return next(iter(names))
    require(key in names, "splits.key", key, f"must name one of the arrays in {file}: {sorted(names)}")
    return key


def _load_npy(file: Path, key: str | None) -> np.ndarray:
    return np.load(file)


def _load_npz(file: Path, key: str | None) -> np.ndarray:
    with np.load(file) as archive:
        return archive[_choose(archive.files, key, file)]


def _load_pt(file: Path, key: str | None) -> torch.Tensor:
    saved = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(saved, dict):
        saved = saved[_choose(list(saved), key, file)]
    if not isinstance(saved, torch.Tensor):
        raise ValueError(f"{file}: expected a tensor or a dict of tensors, found {type(saved).__name__}")
    return saved


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _load_csv(file: Path, key: str | None) -> np.ndarray:
    """Comma-separated numbers; a first line that is not all numbers is taken as a header and skipped."""
    with file.open() as lines:
        header_rows = 0 if all(_is_number(field) for field in lines.readline().split(",")) else 1
    try:
        return np.loadtxt(file, delimiter=",", skiprows=header_rows, ndmin=2)
    except ValueError as error:
        raise ValueError(f"{file}: not a comma-separated numeric table ({error})") from None


_LOADERS: dict[str, Callable[[Path, str | None], np.ndarray | torch.Tensor]] = {
    ".npy": _load_npy,
    ".npz": _load_npz,
    ".pt": _load_pt,
    ".csv": _load_csv,
}


def tensor_file(
    path: str | os.PathLike,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    key: str | None = None,
) -> Splits:
    """A user's own data matrix of shape (N, d), one example a row, split at random by the given fractions.

    Reads ``.npy``, ``.npz`` and ``.pt`` (a tensor, or a dict of them) files, where ``key`` names the array
    when the file holds several, and ``.csv`` files of numbers with an optional header row. A 1-D array is
    taken as N examples of dimension 1.
    """
    file = resolve_path(path)
    loader = _LOADERS.get(file.suffix.lower())
    require(loader is not None, "splits.path", str(path), f"must end in one of {', '.join(_LOADERS)}")
    if not file.is_file():
        raise FileNotFoundError(f"no data file at {file}; set data.splits.path to an existing file")
    data = as_data_matrix(loader(file, key), str(file))
    return split_by_fractions(data, val_fraction, test_fraction, seed)
