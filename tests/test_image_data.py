"""Image datasets: tiny files in each dataset's real format, read through the real torchvision loaders.

torchvision's CIFAR10, SVHN and CelebA compare every file's md5 sum with the real dataset's (``_check_integrity``,
and ``_load_meta`` for CIFAR-10's metadata), and no tiny file can have those sums. The writers below therefore replace
only the expected sums in those classes' checksum tables with the sums of the files they wrote (``monkeypatch``, so
for one test only): the loaders still run their integrity checks, against the written files. MNIST checks only that
its files exist.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import scipy.io
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torchvision.datasets import CIFAR10, SVHN, CelebA

from eblvm.assemble import instantiate_node
from eblvm.data import (
    EBLVMDataModule,
    Splits,
    celeba,
    cifar10,
    digits,
    fashion_mnist,
    image_folder,
    mnist,
    svhn,
)
from eblvm.data.datamodule import flip_horizontally
from eblvm.errors import ConfigError
from eblvm.evaluation.ood import out_of_distribution_rows
from tests.conftest import compose_train_config


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def rows_of(split: torch.Tensor) -> np.ndarray:
    """A split's rows back as the uint8 pixels they were made from (exact: every value is k / 255)."""
    return np.rint(split.numpy() * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Writers: each writes a tiny dataset in its real format under ``root`` and returns what a reader should find.


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as MNIST ships it: 0x00 0x00, type 0x08 (uint8), the rank; big-endian int32 sizes; the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 6, n_test: int = 3) -> dict[str, np.ndarray]:
    """``<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` with random 28x28 digits."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(1, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(1, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(root / folder / "raw" / name, array)
    return arrays


def write_cifar10(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """``<root>/cifar-10-batches-py``: five training batches of 2 images, a test batch of 3, and batches.meta.

    As in the real pickles, each image is a row of 3072 bytes: 1024 red, then green, then blue, each row-major.
    """
    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for name, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        batch = {
            "batch_label": name,
            "labels": labels.tolist(),
            "data": data,
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
        written[name] = (data, labels)
    meta = {"num_cases_per_batch": 2, "label_names": [f"class_{i}" for i in range(10)], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    monkeypatch.setattr(CIFAR10, "train_list", [[name, md5(folder / name)] for name, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[name, md5(folder / name)] for name, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(folder / "batches.meta")})
    train = [written[f"data_batch_{i}"] for i in range(1, 6)]
    return {
        "train": np.concatenate([data for data, _ in train]),
        "train_labels": np.concatenate([labels for _, labels in train]),
        "test": written["test_batch"][0],
        "test_labels": written["test_batch"][1],
    }


def write_svhn(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """``<root>/{train,test}_32x32.mat`` as SVHN ships them: X of shape (32, 32, 3, N) and y of shape (N, 1),
    the digit 0 labelled 10."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    split_list = dict(SVHN.split_list)
    written = {}
    for split, n, digits_written in (("train", 5, [10, 1, 2, 10, 9]), ("test", 2, [3, 10])):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array(digits_written, dtype=np.uint8).reshape(n, 1)
        path = root / SVHN.split_list[split][1]
        scipy.io.savemat(path, {"X": X, "y": y})
        split_list[split] = [*SVHN.split_list[split][:2], md5(path)]
        written[split] = X.transpose(3, 2, 0, 1).reshape(n, -1)  # image i is X[:, :, :, i], as (C, H, W)
        written[f"{split}_labels"] = np.array(digits_written) % 10
    monkeypatch.setattr(SVHN, "split_list", split_list)
    return written


CELEBA_COLOURS = [
    (200, 40, 90),
    (30, 160, 220),
    (250, 250, 20),
    (90, 90, 90),
    (10, 200, 10),
    (120, 60, 180),
    (5, 5, 250),
]
# list_eval_partition: 0 train, 1 valid, 2 test (torchvision's CelebA cannot read a split of a single image)
CELEBA_PARTITION = [0, 0, 0, 1, 1, 2, 2]


def write_celeba(root: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """``<root>/celeba``: JPEGs of 24x28 pixels (width x height), each a black frame around a 16x16 square of one
    colour, in img_align_celeba/, and the five list files torchvision's CelebA reads."""
    folder = root / CelebA.base_folder
    (folder / "img_align_celeba").mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(CELEBA_COLOURS))]
    for name, colour in zip(names, CELEBA_COLOURS, strict=True):
        image = np.zeros((28, 24, 3), dtype=np.uint8)
        image[6:22, 4:20] = colour
        Image.fromarray(image).save(folder / "img_align_celeba" / name, quality=100)
    n = len(names)
    lines = {
        "list_eval_partition.txt": [f"{name} {part}" for name, part in zip(names, CELEBA_PARTITION, strict=True)],
        "identity_CelebA.txt": [f"{name} {i + 1}" for i, name in enumerate(names)],
        "list_attr_celeba.txt": [str(n), "Smiling Young"] + [f"{name}  1 -1" for name in names],
        "list_bbox_celeba.txt": [str(n), "image_id x_1 y_1 width height"] + [f"{name} 1 2 20 24" for name in names],
        "list_landmarks_align_celeba.txt": [
            str(n),
            "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y",
        ]
        + [f"{name} " + " ".join(["12"] * 10) for name in names],
    }
    for file, content in lines.items():
        (folder / file).write_text("\n".join(content) + "\n")
    file_list = [
        (file_id, md5(folder / name) if (folder / name).exists() else sum_, name)
        for file_id, sum_, name in CelebA.file_list
    ]
    monkeypatch.setattr(CelebA, "file_list", file_list)
    return CELEBA_COLOURS


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_image_folder(root: Path) -> dict[str, list[int]]:
    """Two class folders of 8x8 grey PNGs, each image one grey level: a_cats 10, 20, 30; b_dogs 100, 110, 120, 130."""
    levels = {"a_cats": [10, 20, 30], "b_dogs": [100, 110, 120, 130]}
    for folder, values in levels.items():
        for value in values:
            write_png(root / folder / f"{value}.png", np.full((8, 8, 3), value, dtype=np.uint8))
    return levels


# ---------------------------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST


@pytest.mark.parametrize(("read", "folder"), [(mnist, "MNIST"), (fashion_mnist, "FashionMNIST")])
def test_mnist_is_padded_to_32_in_the_centre(tmp_path, read, folder):
    written = write_mnist(tmp_path, folder)
    splits = read(tmp_path, n_val=2)
    train_images, test_images = written["train-images-idx3-ubyte"], written["t10k-images-idx3-ubyte"]
    assert [len(splits.train), len(splits.val), len(splits.test)] == [4, 2, 3]
    assert splits.dim == 32 * 32 and splits.train.dtype == torch.float32
    images = torch.cat([splits.train, splits.val]).reshape(6, 32, 32)
    # the official training images in file order, the last 2 for validation; each centred with 2 zero pixels around
    assert torch.equal(images[:, 2:30, 2:30], torch.from_numpy(train_images).float() / 255)
    assert torch.equal(splits.test.reshape(3, 32, 32)[:, 2:30, 2:30], torch.from_numpy(test_images).float() / 255)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (images[:, border] == 0).all() and (images[:, ~border] > 0).all()  # the written pixels are 1..255
    assert float(images[0, 2, 2]) == pytest.approx(train_images[0, 0, 0] / 255)
    assert splits.train_labels.tolist() == written["train-labels-idx1-ubyte"][:4].tolist()
    assert splits.val_labels.tolist() == written["train-labels-idx1-ubyte"][4:].tolist()
    assert splits.test_labels.tolist() == written["t10k-labels-idx1-ubyte"].tolist()


def test_mnist_unpadded_and_odd_padding(tmp_path):
    written = write_mnist(tmp_path)["train-images-idx3-ubyte"]
    unpadded = mnist(tmp_path, pad_to=28, n_val=1)
    assert unpadded.dim == 28 * 28
    assert np.array_equal(rows_of(unpadded.train), written[:5].reshape(5, -1))
    odd = mnist(tmp_path, pad_to=31, n_val=1).train.reshape(5, 31, 31)  # 1 pixel before, 2 after
    assert torch.equal(odd[:, 1:29, 1:29], torch.from_numpy(written[:5]).float() / 255)
    assert odd[:, :, 29:].abs().sum() == 0 and odd[:, :1].abs().sum() == 0


def test_mnist_argument_errors(tmp_path):
    write_mnist(tmp_path)
    with pytest.raises(ConfigError, match=r"^splits\.n_val=6: must be an integer in \[1, 6\)"):
        mnist(tmp_path, n_val=6)
    with pytest.raises(ConfigError, match=r"^splits\.pad_to=20: must be an integer >= 28"):
        mnist(tmp_path, pad_to=20)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 and SVHN


def test_cifar10_rows_are_the_pickled_images(tmp_path, monkeypatch):
    written = write_cifar10(tmp_path, monkeypatch)
    splits = cifar10(tmp_path, n_val=3)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [7, 3, 3] and splits.dim == 3072
    # CIFAR's rows are already (C, H, W) in row-major order: the flattened images are exactly the written rows.
    assert np.array_equal(rows_of(torch.cat([splits.train, splits.val])), written["train"])
    assert np.array_equal(rows_of(splits.test), written["test"])
    assert torch.equal(splits.train, torch.from_numpy(written["train"][:7]).float() / 255)
    labels = torch.cat([splits.train_labels, splits.val_labels])
    assert labels.tolist() == written["train_labels"].tolist()
    assert splits.test_labels.tolist() == written["test_labels"].tolist()


def test_cifar10_refuses_files_whose_checksum_differs(tmp_path, monkeypatch):
    write_cifar10(tmp_path, monkeypatch)
    with (tmp_path / CIFAR10.base_folder / "data_batch_3").open("ab") as file:
        file.write(b"\0")
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        cifar10(tmp_path, n_val=3)


def test_svhn_images_and_labels(tmp_path, monkeypatch):
    written = write_svhn(tmp_path, monkeypatch)
    splits = svhn(tmp_path, n_val=2)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [3, 2, 2] and splits.dim == 3 * 32 * 32
    assert np.array_equal(rows_of(torch.cat([splits.train, splits.val])), written["train"])
    assert np.array_equal(rows_of(splits.test), written["test"])
    assert torch.cat([splits.train_labels, splits.val_labels]).tolist() == [0, 1, 2, 0, 9]  # 10 is the digit 0
    assert splits.test_labels.tolist() == [3, 0]


def test_out_of_distribution_sets_read_svhn_test_images_and_image_folders(tmp_path, monkeypatch):
    written = write_svhn(tmp_path / "svhn", monkeypatch)
    generator = torch.Generator().manual_seed(0)
    inside = torch.rand(3, 3 * 32 * 32, generator=generator)
    rows = out_of_distribution_rows("svhn", 10, (3, 32, 32), inside, generator, data_dir=tmp_path)
    assert np.array_equal(rows_of(rows), written["test"])
    levels = write_image_folder(tmp_path / "folder")
    rows = out_of_distribution_rows(f"folder:{tmp_path / 'folder'}", 100, (3, 8, 8), torch.rand(2, 192), generator)
    assert sorted(rows_of(rows)[:, 0].tolist()) == sorted(level for values in levels.values() for level in values)
    with pytest.raises(ConfigError, match="ood_sets='svhn': has images of 3072 values, the data's have 64"):
        out_of_distribution_rows("svhn", 10, (1, 8, 8), torch.rand(2, 64), generator, data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# CelebA


def test_celeba_crops_resizes_and_caches(tmp_path, monkeypatch):
    colours = write_celeba(tmp_path, monkeypatch)
    splits = celeba(tmp_path, crop=12, size=6)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [3, 2, 2] and splits.dim == 3 * 6 * 6
    assert splits.train_labels is None
    images = torch.cat([splits.train, splits.val, splits.test]).reshape(7, 3, 6, 6)
    # The 12x12 centre crop lies inside each coloured square (the black frame is cut away); JPEG moves values by <= 3.
    expected = torch.tensor(colours, dtype=torch.float32).view(7, 3, 1, 1) / 255
    assert (images - expected).abs().max() <= 3 / 255

    cache = tmp_path / "celeba" / "celeba_crop12_size6.npz"
    assert cache.is_file()
    with np.load(cache) as arrays:
        assert sorted(arrays.files) == ["test", "train", "valid"]
        assert np.array_equal(arrays["valid"], rows_of(splits.val))
    # A second read takes the cache only: it works without the images and gives the same splits.
    shutil.rmtree(tmp_path / "celeba" / "img_align_celeba")
    again = celeba(tmp_path, crop=12, size=6)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(again, name), getattr(splits, name))
    # Another crop or size is another cache file, made from the images, which are gone now.
    with pytest.raises(FileNotFoundError, match="img_align_celeba"):
        celeba(tmp_path, crop=12, size=4)


# ---------------------------------------------------------------------------------------------------------------
# Image folders


def test_image_folder_with_class_subfolders(tmp_path):
    levels = write_image_folder(tmp_path)
    splits = image_folder(tmp_path, size=8, val_fraction=0.15, test_fraction=0.15, seed=0)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [5, 1, 1] and splits.dim == 3 * 8 * 8
    seen = {}
    for name in ("train", "val", "test"):
        pixels = rows_of(getattr(splits, name))
        assert (pixels == pixels[:, :1]).all()  # each image is one grey level
        seen.update(zip(pixels[:, 0].tolist(), splits.labels(name).tolist(), strict=True))
    assert seen == {value: label for label, values in enumerate(levels.values()) for value in values}


def test_image_folder_without_subfolders_resizes_crops_and_has_no_labels(tmp_path):
    wide = np.full((16, 32, 3), 10, dtype=np.uint8)  # 32 wide, 16 high: a band of 200 in the middle 20 columns
    wide[:, 6:26] = 200
    write_png(tmp_path / "wide.png", wide)
    write_png(tmp_path / "small.png", np.full((4, 4, 3), 77, dtype=np.uint8))
    write_png(tmp_path / "colour.png", np.full((8, 8, 3), (100, 50, 200), dtype=np.uint8))
    splits = image_folder(tmp_path, size=8, val_fraction=0.34, test_fraction=0.33, seed=0)
    assert splits.train_labels is None and splits.dim == 3 * 8 * 8
    images = {int(row[0]): row for row in rows_of(torch.cat([splits.train, splits.val, splits.test]))}
    # wide: shorter side 16 -> 8 (32 -> 16 wide), then the centre 8 columns, all from the band
    assert sorted(images) == [77, 100, 200]
    assert (images[200] == 200).all() and (images[77] == 77).all()
    assert images[100].reshape(3, 8, 8)[:, 0, 0].tolist() == [100, 50, 200]
    grey = image_folder(tmp_path, size=8, grayscale=True, val_fraction=0.34, test_fraction=0.33, seed=0)
    assert grey.dim == 64
    # PIL's ITU-R 601-2 luma: (100 * 19595 + 50 * 38470 + 200 * 7471 + 2^15) >> 16 = 82
    assert sorted(int(row[0]) for row in rows_of(torch.cat([grey.train, grey.val, grey.test]))) == [77, 82, 200]


# ---------------------------------------------------------------------------------------------------------------
# Missing files


MISSING = [
    (mnist, "MNIST/raw/train-images-idx3-ubyte", "torchvision.datasets.MNIST('{root}', download=True)"),
    (fashion_mnist, "FashionMNIST/raw/train-images-idx3-ubyte", "datasets.FashionMNIST('{root}', download=True)"),
    (cifar10, "cifar-10-batches-py/data_batch_1", "torchvision.datasets.CIFAR10('{root}', download=True)"),
    (svhn, "train_32x32.mat", "torchvision.datasets.SVHN('{root}', split='train', download=True)"),
    (celeba, "celeba/list_attr_celeba.txt", "torchvision.datasets.CelebA('{root}', split='all', download=True)"),
]


@pytest.mark.parametrize(("read", "first_file", "command"), MISSING, ids=[read.__name__ for read, *_ in MISSING])
def test_missing_dataset_names_the_path_and_the_fix(tmp_path, monkeypatch, read, first_file, command):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data"  # given as a relative path, resolved from where the run started
    with pytest.raises(FileNotFoundError) as error:
        read("data")
    message = str(error.value)
    assert f"{root / first_file} does not exist" in message
    assert 'python -c "import torchvision; ' in message and command.format(root=root) in message
    assert "data.splits.root=" in message and "data.splits.download=true" in message
    if read is celeba:
        assert "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html" in message


def test_missing_file_is_found_before_any_reading(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte does not exist \(1 of 4 expected"):
        mnist(tmp_path)


def test_missing_image_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no image folder at {tmp_path / 'absent'}: set data.splits.path"):
        image_folder(tmp_path / "absent")


# ---------------------------------------------------------------------------------------------------------------
# Labels


def test_splits_labels_are_checked():
    rows = torch.zeros(4, 2)
    labels = torch.arange(4)
    assert torch.equal(Splits(rows, rows, rows, labels, labels, labels).labels("val"), labels)
    with pytest.raises(ValueError, match="Splits.val_labels has 3 labels for the 4 rows of Splits.val"):
        Splits(rows, rows, rows, labels, labels[:3], labels)
    with pytest.raises(ValueError, match="Splits has labels for train only; give them for all three splits or none"):
        Splits(rows, rows, rows, train_labels=labels)
    with pytest.raises(ValueError, match="Splits.test_labels must be a 1-D int64 tensor"):
        Splits(rows, rows, rows, labels, labels, labels.float())
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        Splits(rows, rows, rows).labels("valid")


def test_digits_carry_their_labels():
    splits = digits(seed=0)
    reference = load_digits()  # its 1797 images are all different, so each row identifies its label
    label_of = {row.tobytes(): int(label) for row, label in zip(reference.data / 16, reference.target, strict=True)}
    for name in ("train", "val", "test"):
        rows, labels = getattr(splits, name).double().numpy(), splits.labels(name)
        assert labels.dtype == torch.int64
        assert labels.tolist() == [label_of[row.tobytes()] for row in rows]


def test_datamodule_labels_follow_the_training_data():
    rows = torch.arange(20, dtype=torch.float32).reshape(10, 2)
    splits = Splits(rows[:6], rows[6:8], rows[8:], torch.arange(6), torch.arange(6, 8), torch.arange(8, 10))
    assert EBLVMDataModule(splits, train_on_val=True).labels("train").tolist() == list(range(8))
    assert EBLVMDataModule(splits).labels("train").tolist() == list(range(6))
    assert EBLVMDataModule(splits).labels("test").tolist() == [8, 9]
    assert EBLVMDataModule(Splits(rows[:6], rows[6:8], rows[8:])).labels("train") is None


# ---------------------------------------------------------------------------------------------------------------
# image_shape and random_flip


def test_image_shape_is_kept_as_channels_height_width():
    splits = Splits(torch.zeros(4, 12), torch.zeros(2, 12), torch.zeros(2, 12))
    assert EBLVMDataModule(splits, image_shape=[3, 4]).image_shape == (1, 3, 4)
    assert EBLVMDataModule(splits, image_shape=[3, 2, 2]).image_shape == (3, 2, 2)
    assert EBLVMDataModule(splits).image_shape is None
    with pytest.raises(ConfigError, match=r"^image_shape=\[3, 2, 3\]: must be \(height, width\) or \(channels"):
        EBLVMDataModule(splits, image_shape=[3, 2, 3])
    with pytest.raises(ConfigError, match=r"^random_flip=True: flips images, so it needs data\.image_shape"):
        EBLVMDataModule(splits, random_flip=True)


def test_flip_horizontally_mirrors_the_width_axis_only():
    image = torch.arange(12.0).reshape(1, 12)  # (C, H, W) = (2, 2, 3): channel c, row h, column w is 6c + 3h + w
    both = torch.cat([image, image + 100])
    flipped = flip_horizontally(both, (2, 2, 3), torch.tensor([True, False]))
    assert flipped[0].tolist() == [2, 1, 0, 5, 4, 3, 8, 7, 6, 11, 10, 9]
    assert torch.equal(flipped[1], both[1])


def numbered_images(n: int) -> torch.Tensor:
    """n images of shape (1, 2, 3) whose 6 pixels are 6 i, ..., 6 i + 5: no two rows or their mirrors collide."""
    return torch.arange(n * 6, dtype=torch.float32).reshape(n, 6)


def test_random_flip_draws_per_rank_and_only_for_training(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    splits = Splits(numbered_images(64), numbered_images(4), numbered_images(4))
    batch = splits.train

    def flips(rank: int, training: bool = True) -> torch.Tensor:
        datamodule = EBLVMDataModule(splits, image_shape=[2, 3], random_flip=True)
        datamodule.trainer = SimpleNamespace(global_rank=rank, training=training)
        out = datamodule.on_after_batch_transfer(batch.clone(), 0)
        mirrored = flip_horizontally(batch, (1, 2, 3), torch.ones(len(batch), dtype=torch.bool))
        assert ((out == batch).all(1) | (out == mirrored).all(1)).all()
        return (out != batch).any(1)

    rank0 = flips(0)
    assert 12 < int(rank0.sum()) < 52  # Binomial(64, 1/2) is within 5 standard deviations of 32
    assert torch.equal(flips(0), rank0) and not torch.equal(flips(1), rank0)
    assert not flips(0, training=False).any()


class BatchRecorder(pl.LightningModule):
    """Keeps every batch the Trainer hands to training_step and validation_step."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.train_batches, self.val_batches = [], []

    def training_step(self, batch, batch_idx):
        self.train_batches.append(batch.clone())
        return self.weight * 0

    def validation_step(self, batch, batch_idx):
        self.val_batches.append(batch.clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_random_flip_in_a_lightning_run(tmp_path):
    pl.seed_everything(3, verbose=False)
    data = numbered_images(40)
    splits = Splits(data[:32], data[32:36], data[36:])
    datamodule = EBLVMDataModule(splits, batch_size=8, eval_batch_size=4, image_shape=[1, 2, 3], random_flip=True)
    recorder = BatchRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=8,
        val_check_interval=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(recorder, datamodule)
    rows = torch.cat(recorder.train_batches)
    index = (rows.min(1).values // 6).long()  # the image each row came from
    original = splits.train[index]
    mirrored = flip_horizontally(original, (1, 2, 3), torch.ones(len(rows), dtype=torch.bool))
    flipped = (rows == mirrored).all(1)
    assert (flipped | (rows == original).all(1)).all() and 0 < int(flipped.sum()) < len(rows)
    assert all(torch.equal(batch, splits.val) for batch in recorder.val_batches)  # never flipped


# ---------------------------------------------------------------------------------------------------------------
# Configs


CONFIGS = {
    "mnist": (lambda root, monkeypatch: write_mnist(root, n_train=12), ["data.splits.n_val=2"], (1, 32, 32)),
    "fashion_mnist": (
        lambda root, monkeypatch: write_mnist(root, "FashionMNIST", n_train=12),
        ["data.splits.n_val=2", "data.splits.pad_to=28"],
        (1, 28, 28),
    ),
    "cifar10": (write_cifar10, ["data.splits.n_val=2"], (3, 32, 32)),
    "svhn": (lambda root, monkeypatch: write_svhn(root / "svhn", monkeypatch), ["data.splits.n_val=2"], (3, 32, 32)),
    "celeba": (write_celeba, ["data.splits.crop=12", "data.splits.size=6"], (3, 6, 6)),
    "image_folder": (
        lambda root, monkeypatch: write_image_folder(root),
        ["data.splits.path=${paths.data_dir}", "data.splits.size=8"],
        (3, 8, 8),
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_image_configs_read_the_files_under_the_data_dir(tmp_path, monkeypatch, name):
    write, overrides, image_shape = CONFIGS[name]
    write(tmp_path, monkeypatch)
    cfg = compose_train_config(tmp_path, [f"data={name}", *overrides])  # paths.data_dir is tmp_path
    datamodule = instantiate_node("data", cfg.data)
    assert datamodule.image_shape == image_shape and datamodule.dim == int(np.prod(image_shape))
    assert datamodule.random_flip == (name == "celeba")
    assert datamodule.train_on_val == (name in ("mnist", "fashion_mnist", "cifar10", "celeba"))
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.shape == (len(datamodule.train_data), datamodule.dim) and 0 <= batch.min() <= batch.max() <= 1


def test_image_config_without_files_stops_with_the_fix(tmp_path):
    cfg = compose_train_config(tmp_path, ["data=mnist"])
    with pytest.raises(FileNotFoundError) as error:
        instantiate_node("data", cfg.data)
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in str(error.value)
    assert f"torchvision.datasets.MNIST('{tmp_path}', download=True)" in str(error.value)
