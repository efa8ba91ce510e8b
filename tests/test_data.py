"""Datasets, splits and the DataModule: sizes, determinism, supports, file formats and error messages."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sklearn.datasets import load_digits
from torchdata.stateful_dataloader.sampler import BatchSampler, RandomSampler

from eblvm.data import (
    EBLVMDataModule,
    Splits,
    checkerboard,
    digits,
    eight_gaussians,
    freyface,
    moons,
    rings,
    split_by_fractions,
    swiss_roll,
    tensor_file,
)
from eblvm.data.datamodule import shuffle_generator
from eblvm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TOYS = [checkerboard, rings, moons, swiss_roll, eight_gaussians]
SIZES = {"n_train": 300, "n_val": 100, "n_test": 50}


def sorted_rows(rows: torch.Tensor | np.ndarray) -> np.ndarray:
    """The rows in lexicographic order, so two data sets can be compared as multisets of rows."""
    rows = np.asarray(rows)
    return rows[np.lexsort(rows.T[::-1])]


def all_rows(splits: Splits) -> torch.Tensor:
    return torch.cat([splits.train, splits.val, splits.test])


@pytest.mark.parametrize("make", TOYS, ids=lambda make: make.__name__)
def test_toy_splits_sizes_and_determinism(make):
    splits = make(**SIZES, seed=3)
    assert [len(splits.train), len(splits.val), len(splits.test)] == list(SIZES.values())
    for split in (splits.train, splits.val, splits.test):
        assert split.dtype == torch.float32 and split.shape[1] == 2
    assert splits.dim == 2
    again = make(**SIZES, seed=3)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(splits, name), getattr(again, name))
    assert not torch.equal(splits.train, make(**SIZES, seed=4).train)
    # The splits are parts of one draw, not copies of each other.
    assert not torch.equal(splits.train[: SIZES["n_test"]], splits.test)
    inside = ((all_rows(splits) > -0.05) & (all_rows(splits) < 1.05)).all(dim=1)
    assert inside.float().mean() > 0.99


@pytest.mark.parametrize("grid", [2, 4])
def test_checkerboard_support_and_mass(grid):
    n = 20000
    points = all_rows(checkerboard(n_train=n - 2, n_val=1, n_test=1, seed=0, grid=grid))
    cell = torch.floor(grid * points).long()
    assert ((points >= 0) & (points < 1)).all()
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()
    counts = torch.bincount(cell[:, 0] * grid + cell[:, 1], minlength=grid * grid)
    even = [i * grid + j for i in range(grid) for j in range(grid) if (i + j) % 2 == 0]
    p = 1 / len(even)
    standard_error = math.sqrt(n * p * (1 - p))
    assert (counts[even].float() - n * p).abs().max() < 5 * standard_error


def test_toy_size_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^splits\.n_val=0: must be an integer >= 1"):
        checkerboard(n_train=10, n_val=0, n_test=10)
    with pytest.raises(ConfigError, match=r"^splits\.grid=0"):
        checkerboard(n_train=10, n_val=10, n_test=10, grid=0)
    assert "data.splits.n_val=0" in str(ConfigError("splits.n_val", 0, "x").with_prefix("data"))


def test_digits():
    splits = digits(val_fraction=0.15, test_fraction=0.15, seed=0)
    data = all_rows(splits)
    assert data.shape == (1797, 64) and data.dtype == torch.float32
    assert data.min() >= 0 and data.max() <= 1 and data.max() == 1
    assert len(splits.val) == len(splits.test) == round(0.15 * 1797)
    assert not torch.equal(splits.train, digits(seed=1).train)
    labels = torch.cat([splits.train_labels, splits.val_labels, splits.test_labels])
    assert torch.equal(torch.bincount(labels), torch.as_tensor(np.bincount(load_digits().target)))


def test_split_by_fractions_keeps_every_row_once():
    data = torch.arange(200, dtype=torch.float32).reshape(100, 2)
    splits = split_by_fractions(data, val_fraction=0.2, test_fraction=0.1, seed=0)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [70, 20, 10]
    assert np.array_equal(sorted_rows(all_rows(splits)), data.numpy())
    assert not torch.equal(splits.train, data[:70])  # shuffled


@pytest.mark.parametrize(
    ("val_fraction", "test_fraction", "message"),
    [
        (1.5, 0.1, r"splits\.val_fraction=1\.5: must be in \[0, 1\)"),
        (0.1, -0.1, r"splits\.test_fraction=-0\.1: must be in \[0, 1\)"),
        (0.6, 0.4, r"splits\.val_fraction=0\.6: val_fraction \+ test_fraction must be < 1"),
        (0.0, 0.1, r"splits\.val_fraction=0\.0: gives 0 of 10 rows"),
    ],
)
def test_split_by_fractions_errors(val_fraction, test_fraction, message):
    with pytest.raises(ConfigError, match=message):
        split_by_fractions(torch.zeros(10, 2), val_fraction, test_fraction, seed=0)


def test_splits_validation_names_the_split():
    good = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="Splits.val contains NaN"):
        Splits(good, torch.tensor([[0.0, float("nan")]]), good)
    with pytest.raises(ValueError, match="Splits.test has 3 columns"):
        Splits(good, good, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="Splits.train must be a 2-D float tensor"):
        Splits(torch.zeros(3), good, good)
    with pytest.raises(ValueError, match="Splits.val is empty"):
        Splits(good, torch.zeros(0, 2), good)


@pytest.fixture
def faces() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(560, 30), dtype=np.uint8)


def test_freyface(tmp_path, faces):
    path = tmp_path / "faces.mat"
    scipy.io.savemat(path, {"ff": faces})
    splits = freyface(path, n_train=20, n_val=5, seed=0)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [20, 5, 5]
    assert splits.dim == 560 and splits.train.dtype == torch.float32
    expected = (faces.T / 255.0).astype(np.float32)
    assert np.array_equal(sorted_rows(all_rows(splits)), sorted_rows(expected))
    assert torch.equal(splits.train, freyface(path, n_train=20, n_val=5, seed=0).train)
    assert not torch.equal(splits.train, freyface(path, n_train=20, n_val=5, seed=1).train)


def test_freyface_errors(tmp_path, faces):
    missing = tmp_path / "nowhere" / "frey_rawface.mat"
    with pytest.raises(FileNotFoundError) as error:
        freyface(missing)
    message = str(error.value)
    assert str(missing) in message and "https://cs.nyu.edu/~roweis/data/frey_rawface.mat" in message
    assert "data.splits.path=" in message

    scipy.io.savemat(tmp_path / "other.mat", {"faces": faces})
    with pytest.raises(ValueError, match=r"expected a variable 'ff'.*\['faces'\]"):
        freyface(tmp_path / "other.mat")
    scipy.io.savemat(tmp_path / "small.mat", {"ff": faces[:100]})
    with pytest.raises(ValueError, match=r"found 'ff' of shape \(100, 30\)"):
        freyface(tmp_path / "small.mat")
    scipy.io.savemat(tmp_path / "few.mat", {"ff": faces})
    too_few = r"^splits\.n_train=25: with n_val=5 must leave at least one of the 30 faces"
    with pytest.raises(ConfigError, match=too_few):
        freyface(tmp_path / "few.mat", n_train=25, n_val=5)


DATA = np.random.default_rng(0).normal(size=(50, 3))


def write_npy(path: Path) -> tuple[Path, str | None]:
    np.save(path.with_suffix(".npy"), DATA)
    return path.with_suffix(".npy"), None


def write_npz(path: Path) -> tuple[Path, str | None]:
    np.savez(path.with_suffix(".npz"), DATA)
    return path.with_suffix(".npz"), None


def write_npz_with_key(path: Path) -> tuple[Path, str | None]:
    np.savez(path.with_suffix(".npz"), x=DATA, labels=np.arange(len(DATA)))
    return path.with_suffix(".npz"), "x"


def write_pt(path: Path) -> tuple[Path, str | None]:
    torch.save(torch.from_numpy(DATA), path.with_suffix(".pt"))
    return path.with_suffix(".pt"), None


def write_pt_dict(path: Path) -> tuple[Path, str | None]:
    torch.save({"x": torch.from_numpy(DATA), "y": torch.zeros(len(DATA))}, path.with_suffix(".pt"))
    return path.with_suffix(".pt"), "x"


def write_csv(path: Path) -> tuple[Path, str | None]:
    np.savetxt(path.with_suffix(".csv"), DATA, delimiter=",")
    return path.with_suffix(".csv"), None


def write_csv_with_header(path: Path) -> tuple[Path, str | None]:
    np.savetxt(path.with_suffix(".csv"), DATA, delimiter=",", header="a,b,c", comments="")
    return path.with_suffix(".csv"), None


@pytest.mark.parametrize(
    "write",
    [write_npy, write_npz, write_npz_with_key, write_pt, write_pt_dict, write_csv, write_csv_with_header],
    ids=lambda write: write.__name__.removeprefix("write_"),
)
def test_tensor_file_round_trip(tmp_path, write):
    path, key = write(tmp_path / "data")
    splits = tensor_file(path, val_fraction=0.2, test_fraction=0.1, seed=0, key=key)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [35, 10, 5]
    assert splits.train.dtype == torch.float32 and splits.dim == 3
    assert np.array_equal(sorted_rows(all_rows(splits)), sorted_rows(DATA.astype(np.float32)))


@pytest.mark.parametrize("inside_hydra", [False, True])
def test_relative_paths_start_from_the_launch_directory(tmp_path, monkeypatch, inside_hydra):
    """Outside Hydra: the current directory. Inside: where the run was launched, not Hydra's run directory."""
    np.save(tmp_path / "x.npy", DATA)
    run_dir = tmp_path / "outputs" / "run"
    run_dir.mkdir(parents=True)
    launch = OmegaConf.create({"hydra": {"runtime": {"cwd": str(tmp_path)}}}) if inside_hydra else None
    monkeypatch.setattr(HydraConfig.instance(), "cfg", launch)
    monkeypatch.chdir(run_dir if inside_hydra else tmp_path)
    assert len(all_rows(tensor_file("x.npy"))) == len(DATA)


def test_tensor_file_one_dimensional_array_is_a_column(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(20.0))
    splits = tensor_file(tmp_path / "x.npy")
    assert splits.dim == 1
    assert sorted(all_rows(splits).squeeze(1).tolist()) == list(range(20))


def test_tensor_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^splits\.path='data\.txt': must end in one of ") as error:
        tensor_file("data.txt")
    assert all(extension in str(error.value) for extension in (".npy", ".npz", ".pt", ".csv"))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.npy"))):
        tensor_file(tmp_path / "absent.npy")
    np.save(tmp_path / "images.npy", np.zeros((10, 4, 4)))
    with pytest.raises(ValueError, match=r"array of shape \(10, 4, 4\), expected \(N, d\); flatten"):
        tensor_file(tmp_path / "images.npy")
    with_nan = np.ones((10, 2))
    with_nan[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", with_nan)
    with pytest.raises(ValueError, match="1 NaN or infinite values"):
        tensor_file(tmp_path / "nan.npy")
    np.savez(tmp_path / "two.npz", a=np.ones((10, 2)), b=np.ones((10, 2)))
    with pytest.raises(ConfigError, match=r"^splits\.key=None: must name one of the arrays .*\['a', 'b'\]"):
        tensor_file(tmp_path / "two.npz")
    (tmp_path / "words.csv").write_text("a,b\n1,2\nx,y\n")
    with pytest.raises(ValueError, match="not a comma-separated numeric table"):
        tensor_file(tmp_path / "words.csv")


def make_splits(n_train: int, n_val: int = 30, n_test: int = 20, d: int = 3) -> Splits:
    data = torch.arange((n_train + n_val + n_test) * d, dtype=torch.float32).reshape(-1, d)
    return Splits(data[:n_train], data[n_train : n_train + n_val], data[n_train + n_val :])


def test_datamodule_batches_are_plain_tensors():
    splits = make_splits(250)
    datamodule = EBLVMDataModule(splits, batch_size=100, eval_batch_size=25)
    assert datamodule.dim == 3 and datamodule.splits is splits
    train_batches = list(datamodule.train_dataloader())
    assert all(isinstance(batch, torch.Tensor) and batch.shape == (100, 3) for batch in train_batches)
    assert len(train_batches) == 2  # the last, partial batch is dropped
    seen = torch.cat(train_batches)
    assert len(np.unique(seen[:, 0].numpy())) == 200 and bool(torch.isin(seen, splits.train).all())
    assert torch.equal(torch.cat(list(datamodule.val_dataloader())), splits.val)  # in order, every row
    assert [len(batch) for batch in datamodule.test_dataloader()] == [20]


def test_datamodule_small_training_set_keeps_its_partial_batch():
    datamodule = EBLVMDataModule(make_splits(40), batch_size=100)
    assert [batch.shape for batch in datamodule.train_dataloader()] == [(40, 3)]


def _member_loader(splits: Splits, seeds: list[int]):
    datamodule = EBLVMDataModule(splits, batch_size=100)
    datamodule.shuffle_seeds = seeds
    return datamodule.train_dataloader()


@pytest.mark.parametrize("n_train", [250, 40])  # full batches (the last partial one dropped), and one partial batch
def test_ensemble_batches_are_each_seeds_own_epoch_after_epoch(monkeypatch, n_train):
    """An ensemble's batch is ``(S, B, d)``, member ``k``'s rows those the run with seed ``k`` alone draws."""
    splits, seeds = make_splits(n_train), [3, 11]
    alone = []
    for seed in seeds:
        monkeypatch.setenv("PL_GLOBAL_SEED", str(seed))
        loader = EBLVMDataModule(splits, batch_size=100).train_dataloader()
        alone.append([batch for _ in range(3) for batch in loader])  # three epochs
    loader = _member_loader(splits, seeds)
    together = [batch for _ in range(3) for batch in loader]
    assert len(together) == len(alone[0]) == 3 * max(n_train // 100, 1)
    for step, batch in enumerate(together):
        assert batch.shape == (2, min(n_train, 100), 3)
        for member in range(2):
            assert torch.equal(batch[member], alone[member][step]), (member, step)


def test_ensemble_batches_resume_mid_epoch_from_either_state_format():
    """A loader restored from a state taken mid-epoch goes on with the same batches, from this format's state and
    from the one ensembles wrote before (one torchdata ``BatchSampler`` iterator state per member)."""
    splits, seeds = make_splits(250), [3, 11]  # two batches an epoch
    interrupted = _member_loader(splits, seeds)
    list(interrupted)  # the first epoch
    epoch = iter(interrupted)
    next(epoch)
    state, expected = interrupted.state_dict(), next(epoch)
    old_members = []
    for seed in seeds:
        sampler = BatchSampler(RandomSampler(splits.train, generator=shuffle_generator(seed)), 100, True)
        list(sampler)  # the first epoch
        second_epoch = iter(sampler)
        next(second_epoch)
        old_members.append(second_epoch.state_dict())
    for saved in (state, {**state, "_sampler_iter_state": {"members": old_members}}):
        resumed = _member_loader(splits, seeds)
        resumed.load_state_dict(saved)
        assert torch.equal(next(iter(resumed)), expected)


def test_ensemble_batches_resume_after_a_partial_batch_from_the_earlier_state_format():
    """A training set smaller than the batch: the one (partial) batch of an epoch, once drawn, is not drawn again
    from the state ensembles wrote before."""
    splits, seeds = make_splits(40), [3, 11]
    old_members = []
    for seed in seeds:
        epoch = iter(BatchSampler(RandomSampler(splits.train, generator=shuffle_generator(seed)), 100, False))
        next(epoch)
        old_members.append(epoch.state_dict())
    iterator = iter(_member_loader(splits, seeds).batch_sampler)
    iterator.load_state_dict({"members": old_members})
    with pytest.raises(StopIteration):
        next(iterator)


def test_datamodule_train_on_val_concatenates():
    splits = make_splits(200)
    datamodule = EBLVMDataModule(splits, batch_size=10, train_on_val=True)
    assert torch.equal(datamodule.train_data, torch.cat([splits.train, splits.val]))
    rows = torch.cat(list(datamodule.train_dataloader()))
    assert np.array_equal(sorted_rows(rows), torch.cat([splits.train, splits.val]).numpy())
    assert torch.equal(torch.cat(list(datamodule.val_dataloader())), splits.val)


def test_datamodule_settings():
    assert EBLVMDataModule(make_splits(50), num_workers=2).train_dataloader().persistent_workers
    assert not EBLVMDataModule(make_splits(50)).train_dataloader().persistent_workers
    with pytest.raises(ConfigError, match=r"^batch_size=0: must be an integer >= 1"):
        EBLVMDataModule(make_splits(50), batch_size=0)
    with pytest.raises(ConfigError, match=r"^eval_batch_size=-1"):
        EBLVMDataModule(make_splits(50), eval_batch_size=-1)
    with pytest.raises(ConfigError, match=r"^image_shape=\[2, 2\]: must be \(height, width\) or \(channels, height"):
        EBLVMDataModule(make_splits(50), image_shape=[2, 2])
    assert EBLVMDataModule(make_splits(50, d=6), image_shape=[2, 3]).image_shape == (1, 2, 3)


@pytest.mark.parametrize("name", [make.__name__ for make in TOYS] + ["digits"])
def test_data_configs_instantiate(name):
    cfg = OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml")
    if "n_train" in cfg.splits:
        cfg.splits.update(SIZES)
    datamodule = instantiate(cfg)
    assert isinstance(datamodule, EBLVMDataModule) and isinstance(datamodule.splits, Splits)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.shape == (cfg.batch_size, datamodule.dim)
