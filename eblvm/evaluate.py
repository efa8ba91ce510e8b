"""Evaluate a saved run again: ``python -m eblvm.evaluate <run dir or .ckpt> [--paper] [--set key=value ...]``.

Rebuilds the run from its checkpoint (``eblvm.assemble.rebuild``) and runs its evaluation callbacks on the test
split (or ``--split val``) with settings that need not fit inside training's validations: ``--paper`` takes the
papers' AIS of 2000 temperatures × 2000 chains and, for image models, FID on 50,000 samples; ``--set`` changes
any ``evaluation.*`` or ``sampling.*`` key. Writes ``metrics.json`` (with the settings and the checkpoint) and
the figures into ``--out`` (default ``<run>/evaluation/<checkpoint name>``) and prints the metrics.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from eblvm.assemble import WEIGHTS, RunParts, rebuild, saved_config
from eblvm.atomic import write_json
from eblvm.checkpoints import load_checkpoint, resolve_checkpoint
from eblvm.errors import ConfigError

PAPER_SETTINGS = ("evaluation.ais_temperatures=2000", "evaluation.ais_chains=2000")
PAPER_IMAGE_SETTINGS = ("evaluation.fid_samples=50000",)
CHANGEABLE = ("evaluation.", "sampling.")
SPLITS = ("test", "val")


def evaluation_trainer(parts: RunParts, out: Path, device: str = "cpu", **settings) -> pl.Trainer:
    """A Trainer that only evaluates: ``parts``' evaluation callbacks, no logger and no checkpoints, figures under
    ``out``; ``settings`` are further ``pl.Trainer`` arguments (e.g. ``limit_val_batches``)."""
    return pl.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        logger=False,
        callbacks=list(parts.evaluation_callbacks),  # the Trainer adds its own to the list
        inference_mode=False,  # scores are gradients
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(out),
        **settings,
    )


def evaluate(
    checkpoint: str | Path,
    overrides: tuple[str, ...] = (),
    paper: bool = False,
    weights: str = "saved",
    split: str = "test",
    device: str = "cpu",
    out: Path | None = None,
) -> dict:
    """The metrics of ``checkpoint``'s run under its config with ``overrides`` (after the papers' settings when
    ``paper``); also written to ``<out>/metrics.json`` with what produced them (``record["out"]``)."""
    for override in overrides:
        key = override.partition("=")[0]
        if not key.startswith(CHANGEABLE):
            raise ConfigError(key, override, "evaluation may change evaluation.* and sampling.* keys only")
    if split not in SPLITS:
        raise ConfigError("split", split, f"must be one of {', '.join(SPLITS)}")
    file = resolve_checkpoint(checkpoint)
    saved = load_checkpoint(file)
    if paper:
        _, data_shapes = saved_config(saved, file)
        images = data_shapes is not None and data_shapes["image_shape"] is not None
        overrides = (*PAPER_SETTINGS, *(PAPER_IMAGE_SETTINGS if images else ()), *overrides)
    trained = rebuild(file, weights, overrides=overrides, saved=saved)
    parts = trained.parts
    out = out or file.parent.parent / "evaluation" / file.stem
    out.mkdir(parents=True, exist_ok=True)
    trainer = evaluation_trainer(parts, out, device)
    module = parts.module(trained.config)
    start = time.perf_counter()
    run_split = trainer.test if split == "test" else trainer.validate
    (metrics,) = run_split(module, parts.datamodule, verbose=False)
    record = {
        "checkpoint": str(file),
        "out": str(out),
        "step": trained.checkpoint.get("global_step"),
        "weights": weights,
        "split": split,
        "overrides": list(overrides),
        "evaluation": OmegaConf.to_container(trained.config.evaluation, resolve=True),
        **parts.evaluation_record(),
        "seconds": round(time.perf_counter() - start, 2),
        "metrics": {name: float(value) for name, value in metrics.items()},
    }
    write_json(out / "metrics.json", record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a run directory (uses checkpoints/last.ckpt) or a .ckpt file")
    parser.add_argument("--paper", action="store_true", help="the papers' AIS (2000 x 2000) and FID (50k samples)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="evaluation.* / sampling.* keys")
    parser.add_argument("--split", choices=SPLITS, default="test")
    parser.add_argument("--weights", choices=WEIGHTS, default="saved", help="saved (EMA if the run used it) | raw")
    parser.add_argument("--out", type=Path, help="output folder (default <run>/evaluation/<checkpoint name>)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        record = evaluate(args.checkpoint, tuple(args.set), args.paper, args.weights, args.split, args.device, args.out)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    print(f"{record['checkpoint']} (step {record['step']}, {record['weights']} weights), {record['split']} split:")
    for name, value in record["metrics"].items():
        print(f"  {name:<32} {value:.4f}")
    if record.get("log_z"):
        print(f"  log Z: {record['log_z']}")
    print(f"wrote {record['out']}/metrics.json")


if __name__ == "__main__":
    main()
