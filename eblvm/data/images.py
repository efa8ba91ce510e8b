"""Image datasets read from local files through torchvision's dataset classes.

Every function returns ``Splits`` of float32 rows in [0, 1], each an image of C channels and H x W pixels flattened
in (C, H, W) order, with the class labels when the dataset has them. Nothing is downloaded unless ``download=True``:
a missing dataset raises FileNotFoundError, before any reading, naming the files torchvision expects and the command
that fetches them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms
from torchvision.datasets import CIFAR10, MNIST, SVHN, CelebA, FashionMNIST, ImageFolder, VisionDataset
from tqdm import tqdm

from eblvm.atomic import opened
from eblvm.data.files import resolve_path
from eblvm.data.splits import Splits, split_by_fractions
from eblvm.errors import require, require_count

log = logging.getLogger(__name__)

CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
MNIST_SIZE = 28
CELEBA_SPLITS = ("train", "valid", "test")

# Rows of one split as read from the files: uint8 (N, C*H*W) pixels and int64 (N,) labels, or None if unlabelled.
Part = tuple[torch.Tensor, torch.Tensor | None]


def _download_command(dataset: type[VisionDataset], root: Path, *arguments: str) -> str:
    """The shell command that downloads ``dataset`` into ``root``: one constructor call per entry of ``arguments``."""
    calls = "; ".join(
        f"torchvision.datasets.{dataset.__name__}({str(root)!r}{extra}, download=True)" for extra in arguments or ("",)
    )
    return f'python -c "import torchvision; {calls}"'


def _require_files(dataset: type[VisionDataset], root: Path, expected: Sequence[str], fetch: str, note: str) -> None:
    """Raise FileNotFoundError unless every path in ``expected`` (relative to ``root``) exists.

    The message names the first missing path, the whole layout torchvision reads, and how to get it: ``fetch`` (a
    command to run where there is network access), then ``note`` (another way, or what to do with the files).
    """
    missing = [name for name in expected if not (root / name).exists()]
    if not missing:
        return
    layout = "\n".join(f"  {root / name}" for name in expected)
    raise FileNotFoundError(
        f"{dataset.__name__} not found: {root / missing[0]} does not exist ({len(missing)} of {len(expected)} "
        f"expected paths missing). torchvision.datasets.{dataset.__name__} reads, under data.splits.root={root}:\n"
        f"{layout}\n"
        f"To get them, run on a machine with network access\n  {fetch}\n"
        f"and copy what it writes under {root} to the same place here (or set data.splits.root to where it is; where "
        f"this machine has network access, data.splits.download=true does the same).\n{note}"
    )


def _read(dataset: VisionDataset, description: str) -> Part:
    """Every (image, label) of ``dataset``, whose transform turns an image into a uint8 (C, H, W) tensor.

    Returns the images as rows of a uint8 (N, C*H*W) tensor and the labels as an int64 (N,) tensor, or None when
    the dataset gives no labels; shows progress as ``description``.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{description}: the dataset has no images")
    rows = labels = None
    for index in tqdm(range(n), desc=description, unit="image", mininterval=2):
        image, label = dataset[index]
        if rows is None:
            rows = torch.empty(n, image.numel(), dtype=torch.uint8)
            labels = None if label is None else torch.empty(n, dtype=torch.int64)
        rows[index] = image.reshape(-1)
        if labels is not None:
            labels[index] = label
    return rows, labels


def _unit(rows: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as float32 in [0, 1]."""
    return rows.to(torch.float32) / 255


def _as_splits(train: Part, val: Part, test: Part) -> Splits:
    """``Splits`` of float32 rows in [0, 1] from the uint8 rows and labels of each split."""
    parts = (train, val, test)
    return Splits(*(_unit(rows) for rows, _ in parts), *(labels for _, labels in parts))


def _official_train_test(
    dataset: type[VisionDataset],
    root: Path,
    n_val: int,
    transform: Callable,
    download: bool,
    train: dict[str, object],
    test: dict[str, object],
) -> Splits:
    """A labelled dataset's official training set (``dataset(**train)``) less its last ``n_val`` images, those
    ``n_val`` images, and its official test set (``dataset(**test)``)."""
    train_set = dataset(root, transform=transform, download=download, **train)
    test_set = dataset(root, transform=transform, download=download, **test)
    n = len(train_set)
    require(
        isinstance(n_val, int) and 1 <= n_val < n,
        "splits.n_val",
        n_val,
        f"must be an integer in [1, {n}): the validation images held out from the {n} training images",
    )
    rows, labels = _read(train_set, f"{dataset.__name__} train")
    n_train = n - n_val
    return _as_splits(
        (rows[:n_train], labels[:n_train]),
        (rows[n_train:], labels[n_train:]),
        _read(test_set, f"{dataset.__name__} test"),
    )


def _mnist_like(dataset: type[MNIST], root: str | os.PathLike, pad_to: int, n_val: int, download: bool) -> Splits:
    """``mnist`` and ``fashion_mnist``, which differ only in the torchvision class (and so the folder) they read."""
    require(
        isinstance(pad_to, int) and pad_to >= MNIST_SIZE,
        "splits.pad_to",
        pad_to,
        f"must be an integer >= {MNIST_SIZE} (the images are {MNIST_SIZE}x{MNIST_SIZE}; {MNIST_SIZE} leaves them)",
    )
    root = resolve_path(root)
    if not download:
        raw = f"{dataset.__name__}/raw"
        _require_files(
            dataset,
            root,
            [f"{raw}/{os.path.splitext(name)[0]}" for name, _ in dataset.resources],
            _download_command(dataset, root),
            note=f"The files are the uncompressed IDX files: gunzip any *.gz copies in {root / raw}.",
        )
    extra = pad_to - MNIST_SIZE
    left_top = extra // 2
    pad = transforms.Pad((left_top, left_top, extra - left_top, extra - left_top))
    transform = transforms.Compose([pad, transforms.PILToTensor()])
    return _official_train_test(dataset, root, n_val, transform, download, {"train": True}, {"train": False})


def mnist(root: str | os.PathLike, pad_to: int = 32, n_val: int = 10000, download: bool = False) -> Splits:
    """MNIST digits in [0, 1], zero-padded from 28x28 to ``pad_to`` x ``pad_to`` (the image in the centre), labels 0-9.

    Train and val are the official 60000 training images, the last ``n_val`` of them held out for validation
    (``train_on_val`` trains on all 60000, as in the BiSM paper); test is the official 10000. Reads
    ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` through ``torchvision.datasets.MNIST``.
    """
    return _mnist_like(MNIST, root, pad_to, n_val, download)


def fashion_mnist(root: str | os.PathLike, pad_to: int = 32, n_val: int = 10000, download: bool = False) -> Splits:
    """Fashion-MNIST (clothing, labels 0-9), exactly as ``mnist`` but read from ``<root>/FashionMNIST/raw`` through
    ``torchvision.datasets.FashionMNIST``."""
    return _mnist_like(FashionMNIST, root, pad_to, n_val, download)


def cifar10(root: str | os.PathLike, n_val: int = 10000, download: bool = False) -> Splits:
    """CIFAR-10: 32x32 RGB images in [0, 1] (no flips), d = 3072, labels 0-9.

    Train and val are the official 50000 training images, the last ``n_val`` held out; test is the official 10000.
    Reads ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` (the extracted
    cifar-10-python.tar.gz) through ``torchvision.datasets.CIFAR10``, which checks their md5 sums.
    """
    root = resolve_path(root)
    if not download:
        files = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
        _require_files(
            CIFAR10,
            root,
            [f"{CIFAR10.base_folder}/{name}" for name in files],
            _download_command(CIFAR10, root),
            note=f"Or download {CIFAR10.url} and extract it in {root}.",
        )
    transform = transforms.PILToTensor()
    return _official_train_test(CIFAR10, root, n_val, transform, download, {"train": True}, {"train": False})


def svhn(root: str | os.PathLike, n_val: int = 10000, download: bool = False) -> Splits:
    """SVHN house-number digits: 32x32 RGB in [0, 1], d = 3072, labels 0-9 (torchvision maps the files' 10 to 0).

    Train and val are the official 73257 training images, the last ``n_val`` held out; test is the official 26032
    (the "extra" images are not used). Reads ``<root>/train_32x32.mat`` and ``<root>/test_32x32.mat`` through
    ``torchvision.datasets.SVHN``, which checks their md5 sums.
    """
    root = resolve_path(root)
    splits = ("train", "test")
    if not download:
        _require_files(
            SVHN,
            root,
            [SVHN.split_list[split][1] for split in splits],
            _download_command(SVHN, root, *(f", split={split!r}" for split in splits)),
            note=f"Or download {' and '.join(SVHN.split_list[split][0] for split in splits)} into {root}.",
        )
    transform = transforms.PILToTensor()
    return _official_train_test(SVHN, root, n_val, transform, download, {"split": "train"}, {"split": "test"})


def celeba(root: str | os.PathLike, crop: int = 140, size: int = 32, download: bool = False) -> Splits:
    """CelebA aligned faces, centre-cropped to ``crop`` x ``crop`` and resized to ``size`` x ``size``: RGB in [0, 1].

    The official train / valid / test partition (162770 / 19867 / 19962 images); no labels. Reads
    ``<root>/celeba/img_align_celeba/*.jpg`` and the list files through ``torchvision.datasets.CelebA``. Decoding
    the 200k JPEGs takes minutes, so the first call saves the processed uint8 images to
    ``<root>/celeba/celeba_crop<crop>_size<size>.npz`` and later calls read that file instead.
    """
    for key, value in (("crop", crop), ("size", size)):
        require_count(f"splits.{key}", value, 1)
    root = resolve_path(root)
    folder = root / CelebA.base_folder
    cache = folder / f"celeba_crop{crop}_size{size}.npz"
    if cache.is_file():
        log.info("CelebA: reading the processed images from %s", cache)
        with np.load(cache) as arrays:
            parts = {split: torch.from_numpy(arrays[split]) for split in CELEBA_SPLITS}
    else:
        if not download:
            _require_files(
                CelebA,
                root,
                [f"{CelebA.base_folder}/{name}" for _, _, name in CelebA.file_list if not name.endswith(".zip")]
                + [f"{CelebA.base_folder}/img_align_celeba"],
                _download_command(CelebA, root, ", split='all'"),
                note=(
                    f"torchvision fetches CelebA from Google Drive, which often refuses (download quota); the same "
                    f"files are linked from {CELEBA_URL}: unzip img_align_celeba.zip (Align&Cropped Images) into "
                    f"{folder} and put the Anno/ and Eval/ .txt files beside it."
                ),
            )
        log.info("CelebA: cropping (%d) and resizing (%d) the images in %s; done once, then cached", crop, size, folder)
        transform = transforms.Compose([transforms.CenterCrop(crop), transforms.Resize(size), transforms.PILToTensor()])
        parts = {
            split: _read(
                CelebA(root, split=split, target_type=[], transform=transform, download=download),
                f"CelebA {split} (crop {crop}, size {size})",
            )[0]
            for split in CELEBA_SPLITS
        }
        _write_cache(cache, parts)
    return _as_splits(*((parts[split], None) for split in CELEBA_SPLITS))


def _write_cache(cache: Path, arrays: dict[str, torch.Tensor]) -> None:
    """Save ``arrays`` to ``cache`` through a temporary file, so a partial cache never appears; warn if it fails."""
    try:
        with opened(cache) as file:
            np.savez(file, **{name: array.numpy() for name, array in arrays.items()})
    except OSError as error:
        log.warning("CelebA: could not write %s (%s); the images will be processed again next time", cache, error)
    else:
        log.info("CelebA: wrote %s", cache)


class _FlatImageFolder(ImageFolder):
    """``ImageFolder`` over a folder that holds the images themselves rather than one subfolder per class."""

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        """One unnamed class: the folder itself."""
        return [""], {"": 0}


def image_folder(
    path: str | os.PathLike,
    size: int = 32,
    grayscale: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> Splits:
    """Any folder of images, resized (shorter side) and centre-cropped to ``size`` x ``size``, in [0, 1].

    ``path/<class>/<image>`` (``torchvision.datasets.ImageFolder``'s layout) gives labels, the classes numbered in
    alphabetical order; images directly in ``path`` give none. ``grayscale`` keeps one channel (d = size^2), else
    three (d = 3 size^2). Shuffled with ``seed``, then ``val_fraction`` and ``test_fraction`` are held out.
    """
    require_count("splits.size", size, 1)
    folder = resolve_path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no image folder at {folder}: set data.splits.path to a folder of images, either path/<class>/<image> "
            "or the images directly in path"
        )
    has_classes = any(entry.is_dir() for entry in folder.iterdir())
    channels = [transforms.Grayscale()] if grayscale else []
    transform = transforms.Compose(
        [transforms.Resize(size), transforms.CenterCrop(size), *channels, transforms.PILToTensor()]
    )
    dataset = (ImageFolder if has_classes else _FlatImageFolder)(folder, transform=transform)
    rows, labels = _read(dataset, f"images in {folder}")
    return split_by_fractions(_unit(rows), val_fraction, test_fraction, seed, labels=labels if has_classes else None)
