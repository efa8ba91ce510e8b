"""Shared test set-up: no network, no W&B, float64 helpers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import eblvm.config  # noqa: F401  (registers the schema that conf/train.yaml names first)

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# The tests' own objectives and callbacks may be named as _target_s (subprocesses inherit it).
os.environ.setdefault("EBLVM_TRUSTED_TARGETS", "tests")


@pytest.fixture(autouse=True)
def _forget_hydra_config():
    """Tests that compose a run set Hydra's global config; clear it so later tests resolve paths from their cwd."""
    yield
    HydraConfig.instance().cfg = None


@pytest.fixture
def random_inception_weights(tmp_path) -> Path:
    """A weights file for torch-fidelity's FID Inception-v3 with random He-initialised weights (features stay of
    order one through the depth), standing in for the real file, which is not downloaded in tests."""
    from torch import nn
    from torch_fidelity import feature_extractor_inceptionv3

    extractor = feature_extractor_inceptionv3.FeatureExtractorInceptionV3
    with mock.patch("torch.load"), mock.patch.object(extractor, "load_state_dict"):
        net = extractor("inception-v3-compat", ["2048"], "unused")
    generator = torch.Generator().manual_seed(0)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.data = torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: on a machine of few cores, more threads only contend."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def float64():
    """Run a test in double precision (finite differences and exact identities)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


ROOT = Path(__file__).resolve().parents[1]

# Settings that keep an end-to-end run to seconds (conf/debug/fast.yaml): few steps, small evaluation, short Gibbs
# chains, the csv logger. Overrides after it win, e.g. FAST_RUN + ["trainer.max_steps=600"] or + ["logger=wandb"].
FAST_RUN = ["debug=fast"]


# A few seconds of BiMDSM on digits with a tiny network and a short Langevin schedule (conf/debug/fast_deep.yaml).
FAST_DEEP = ["experiment=digits_bimdsm", "debug=fast_deep"]

# A few seconds of BiDVL on digits with tiny networks (conf/debug/fast_bidvl.yaml).
FAST_BIDVL = ["experiment=digits_bidvl", "debug=fast_bidvl"]


def checkpoint_every(steps: int, folder: Path) -> list[str]:
    """Overrides that also save a checkpoint every ``steps`` steps into ``folder/every`` (what a run interrupted at
    one of those steps resumes from: ``saved_at``)."""
    return [
        "+callbacks.every._target_=pytorch_lightning.callbacks.ModelCheckpoint",
        f"+callbacks.every.dirpath={folder / 'every'}",
        f"+callbacks.every.every_n_train_steps={steps}",
        "+callbacks.every.save_top_k=-1",
    ]


def saved_at(step: int, folder: Path) -> Path:
    """The checkpoint ``checkpoint_every`` saved at ``step``, copied to ``folder/step<step>.ckpt`` (Lightning's name
    holds "=", which a Hydra override's value cannot)."""
    (saved,) = (folder / "every").glob(f"*-step={step}.ckpt")
    return Path(shutil.copy(saved, folder / f"step{step}.ckpt"))


def compose_train_config(output_dir: Path, overrides: list[str]) -> DictConfig:
    """The config ``python train.py <overrides>`` would run, writing into ``output_dir``."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.data_dir = str(output_dir)
        del cfg.hydra  # as in a real run: the job's config holds no hydra node (the resolver still reads it)
    return cfg
