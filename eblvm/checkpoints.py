"""Checkpoints: written atomically, verified before use, and turned back into a run's data, model and posterior."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from eblvm.errors import ConfigError
from eblvm.models.base import EnergyModel
from eblvm.posteriors.base import Posterior

WEIGHTS = ("saved", "raw")


@dataclass
class TrainedRun:
    """What a run directory holds: its resolved config, data, model, posterior (None if it trained none) and the
    loaded checkpoint dictionary."""

    config: DictConfig
    datamodule: Any
    model: EnergyModel
    posterior: Posterior | None
    checkpoint: dict[str, Any]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic: the checkpoint goes to a hidden temporary file beside the target,
    is flushed to disk, and is renamed over the target. A run killed mid-write leaves the previous file intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        with open(partial, "rb") as file:
            os.fsync(file.fileno())
        os.replace(partial, path)


def gather_rank_states(trainer, state: torch.Tensor) -> torch.Tensor:
    """Every rank's ``state`` (a generator state) stacked as (world_size, n), for the checkpoint rank 0 writes.

    Called on all ranks at once (Lightning builds a checkpoint on every rank); without a trainer, one row.
    """
    if trainer is None or trainer.world_size == 1:
        return state.unsqueeze(0)
    strategy = trainer.strategy
    return strategy.all_gather(state.to(strategy.root_device)).cpu()


def own_rank_state(trainer, states: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's row of ``states`` as ``gather_rank_states`` stacked them; None when there are none or they were
    saved by a different number of ranks (the generator then starts from its seed)."""
    rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    return states[rank] if states is not None and len(states) == world_size else None


def last_checkpoint(run_dir: str | Path) -> Path:
    """``<run>/checkpoints/last.ckpt``: the latest state of a run, written at every validation and on preemption."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def verify_checkpoint(path: str | Path, key: str = "ckpt_path") -> None:
    """Raise ``ConfigError`` naming ``key`` unless ``path`` is a complete checkpoint.

    Torch checkpoints are zip archives: a truncated or overwritten file fails to open or fails a member's CRC.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        damaged = str(error)
    if damaged is not None:
        raise ConfigError(
            key,
            str(path),
            f"is not a complete checkpoint (truncated or corrupt: {damaged}); resume from another one "
            "(e.g. checkpoints/best.ckpt) or remove it to start over",
        )


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (then its ``checkpoints/last.ckpt``); a clear error if absent."""
    path = Path(path)
    file = last_checkpoint(path) if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {file}: pass a run directory (holding checkpoints/last.ckpt) or a .ckpt file"
        )
    return file


def _submodule_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name.removeprefix(prefix): value for name, value in state.items() if name.startswith(prefix)}


def load_run(checkpoint: str | Path, weights: str = "saved", with_data: bool = True) -> TrainedRun:
    """Rebuild the run that wrote ``checkpoint`` (its ``config.yaml`` sits two levels up).

    ``weights="saved"`` loads the checkpoint's ``state_dict`` (the EMA weights when the run averaged them);
    ``"raw"`` the raw weights of an EMA run (``current_model_state``). ``with_data`` builds the datamodule (needed
    for image shapes and for sampling via q); without it only vector models can be rebuilt.
    """
    from eblvm.run import build  # late: run.py imports the training stack

    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: must be one of {', '.join(WEIGHTS)}")
    file = resolve_checkpoint(checkpoint)
    verify_checkpoint(file, key="checkpoint")
    config_file = file.parent.parent / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: {file} must sit in <run>/checkpoints/ of an eblvm run")
    config = OmegaConf.load(config_file)
    saved = torch.load(file, map_location="cpu", weights_only=False)
    state = saved["state_dict"]
    if weights == "raw":
        if "current_model_state" not in saved:
            raise ValueError(f"{file} holds no separate raw weights (the run used no EMA): use weights=saved")
        state = saved["current_model_state"]
    datamodule = build("data", config.data) if with_data else None
    shapes = {"v_dim": datamodule.dim, "image_shape": datamodule.image_shape} if with_data else {}
    model = build("model", config.model, **shapes)
    model.load_state_dict(_submodule_state(state, "model."))
    posterior_state = _submodule_state(state, "posterior.")
    posterior = None
    if posterior_state or config.objective.get("estimator") == "bism":
        posterior = build("posterior", config.posterior, **shapes, model=model)
        posterior.load_state_dict(posterior_state)
    return TrainedRun(config, datamodule, model, posterior, saved)
