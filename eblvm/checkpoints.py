"""Checkpoints: written atomically, verified and loaded safely (tensors and plain values only), versioned.

Every checkpoint eblvm writes holds, beside Lightning's state, ``checkpoint["eblvm"]``: the format version, the
run's resolved config and its data shapes, so a checkpoint alone rebuilds its run (``eblvm.assemble.rebuild``).
Loading never runs code: ``torch.load(weights_only=True)``, with the three numpy globals that rebuild an array
allowed (checkpoints of format 0, written before the version existed, hold numpy's random state as an array).
"""

from __future__ import annotations

import pickle
import random
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from eblvm.atomic import replacing
from eblvm.errors import ConfigError

FORMAT_VERSION = 1
RECORD_KEY = "eblvm"

# What rebuilds a numpy array; nothing else beyond tensors and plain Python values is ever unpickled.
NUMPY_ARRAY_GLOBALS = (np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType)


def load_checkpoint(path: str | Path, map_location: Any = "cpu", key: str = "checkpoint") -> dict[str, Any]:
    """``torch.load`` of a complete checkpoint with ``weights_only=True``; a file that needs anything else to
    unpickle (an object whose pickle could run code) is refused with a ``ConfigError`` naming the file."""
    verify_checkpoint(path, key)
    try:
        with torch.serialization.safe_globals(list(NUMPY_ARRAY_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).split("\n\n", 1)[0].strip()
        raise ConfigError(
            key,
            str(path),
            f"refused: it holds more than tensors and plain values, and loading it could run code ({reason})",
        ) from None


class CheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint reader and writer, made safe and atomic.

    Writing: through ``eblvm.atomic.replacing``, so a run killed mid-write leaves the previous file intact.
    Reading: ``load_checkpoint``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        with replacing(path) as partial:
            super().save_checkpoint(checkpoint, partial, storage_options)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None):
        return load_checkpoint(path, map_location or "cpu", key="ckpt_path")


def random_states() -> dict[str, Any]:
    """The global torch, numpy and Python random states as tensors and plain values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the global state itself)
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    """Restore what ``random_states`` saved (format 0's numpy state, an array, is accepted as well)."""
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((kind, keys.astype(np.uint32), position, has_gauss, cached))  # noqa: NPY002
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "torch.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])


def gather_rank_states(trainer, state: torch.Tensor) -> torch.Tensor:
    """Every rank's ``state`` (a generator state, a chain) stacked as ``(world_size, ...)``, for the checkpoint
    rank 0 writes. Called on all ranks at once (Lightning builds a checkpoint on every rank); without a trainer,
    one row."""
    if trainer is None or trainer.world_size == 1:
        return state.unsqueeze(0)
    strategy = trainer.strategy
    return strategy.all_gather(state.to(strategy.root_device)).cpu()


def own_rank_state(trainer, states: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's row of ``states`` as ``gather_rank_states`` stacked them; None when there are none or they were
    saved by a different number of ranks (the generator then starts from its seed)."""
    rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    if states is not None and len(states) != world_size:
        warnings.warn(
            f"the checkpoint holds the states of {len(states)} ranks and this run has {world_size}: each rank's "
            "noise and chains start afresh, so the resumed run is not the one it continues",
            stacklevel=2,
        )
    # a copy of its own: a row of the stacked tensor starts inside another's storage, which Generator.set_state
    # does not take (rank 1 of a resumed DDP run crashed in it)
    return states[rank].clone() if states is not None and len(states) == world_size else None


def last_checkpoint(run_dir: str | Path) -> Path:
    """``<run>/checkpoints/last.ckpt``: the latest state of a run, written at every validation, at the final step
    and on preemption."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def verify_checkpoint(path: str | Path, key: str = "ckpt_path") -> None:
    """Raise ``ConfigError`` naming ``key`` unless ``path`` can be read and is a complete checkpoint.

    Torch checkpoints are zip archives: a truncated or overwritten file fails to open or fails a member's CRC.
    A file that cannot be read at all (permissions, a folder) is reported as such.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except zipfile.BadZipFile as error:
        damaged = str(error)
    except OSError as error:
        raise ConfigError(key, str(path), f"cannot be read ({type(error).__name__}: {error.strerror})") from None
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
