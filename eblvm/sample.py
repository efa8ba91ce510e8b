"""Draw samples from a trained run: ``python -m eblvm.sample <run dir or .ckpt> [--n-samples N] [--mode MODE]``.

Writes ``grid.png`` (up to 100 samples), ``samples.npz`` (all samples, ``(N, C, H, W)`` float32 in the data's
scale) and, with ``--png``, one PNG per sample, into ``--out`` (default ``<run>/samples/<checkpoint name>``).
Deep energies are sampled by annealed Langevin with the run's ``sampling.langevin`` schedule (change any of it
with ``--schedule key=value``), or by their generator (BiDVL); GRBMs by Gibbs sampling. The grid shows [0, 1]
pixels whatever the data's scale.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eblvm.assemble import WEIGHTS, rebuild
from eblvm.atomic import opened
from eblvm.checkpoints import resolve_checkpoint
from eblvm.errors import ConfigError
from eblvm.evaluation.plots import save_image_grid
from eblvm.sampling.draw import MODES, draw_samples

# Sampling needs no Inception weights, whatever the run measured.
NO_IMAGE_METRICS = ("evaluation.fid_samples=0",)


def _schedule_overrides(pairs: list[str]) -> dict[str, float]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--schedule {pair!r}: expected key=value, e.g. --schedule anneal_steps=500")
        overrides[key] = float(value) if "." in value or "e" in value else int(value)
    return overrides


def sample(
    checkpoint: str | Path,
    n_samples: int = 64,
    mode: str | None = None,
    weights: str = "saved",
    schedule: dict | None = None,
    out: Path | None = None,
    seed: int = 0,
    write_pngs: bool = False,
    device: str = "cpu",
) -> Path:
    """Draw ``n_samples`` from the run of ``checkpoint`` and write them into ``out``; returns ``out``."""
    file = resolve_checkpoint(checkpoint)
    trained = rebuild(file, weights, overrides=NO_IMAGE_METRICS)
    config = trained.parts.sampling
    try:
        config = replace(config, mode=mode or config.mode, langevin=replace(config.langevin, **(schedule or {})))
    except (ConfigError, TypeError) as error:
        raise SystemExit(f"sampling settings: {error}") from None
    image_shape = trained.datamodule.image_shape
    if image_shape is None:
        raise SystemExit(f"{file}: the run's data are not images (data.image_shape is unset)")
    model = trained.model.to(device)
    posterior = trained.posterior.to(device) if trained.posterior is not None else None
    generator_net = trained.parts.generator.to(device).eval() if trained.parts.generator is not None else None
    generator = torch.Generator(device=device).manual_seed(seed)
    train = trained.datamodule.train_data
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    reference = train[order[torch.arange(n_samples) % len(train)]]  # via_q: cycles when asked for more rows
    chunk = config.n_images
    batches = []
    description = f"sampling ({config.resolve_mode(model, posterior, generator_net)})"
    for start in tqdm(range(0, n_samples, chunk), desc=description):
        rows = reference[start : start + chunk].to(device)
        size = min(chunk, n_samples - start)
        drawn = draw_samples(model, posterior, config, size, generator, rows[:size], generator_net=generator_net)
        batches.append(drawn.cpu())
    images = torch.cat(batches).reshape(-1, *image_shape)
    pixels = trained.datamodule.to_unit(images)
    out = out or file.parent.parent / "samples" / file.stem
    out.mkdir(parents=True, exist_ok=True)
    save_image_grid(pixels[:100], out / "grid.png", nrow=math.ceil(math.sqrt(min(len(images), 100))))
    with opened(out / "samples.npz") as file:
        np.savez_compressed(file, samples=images.numpy().astype(np.float32))
    if write_pngs:
        for index, image in enumerate(pixels):
            save_image_grid(image[None], out / f"{index:05d}.png", nrow=1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a run directory (uses checkpoints/last.ckpt) or a .ckpt file")
    parser.add_argument("--n-samples", type=int, default=64)
    parser.add_argument("--mode", choices=MODES, help="sampling mode (default: the run's sampling.mode)")
    parser.add_argument("--weights", choices=WEIGHTS, default="saved", help="saved (EMA if the run used it) | raw")
    parser.add_argument("--schedule", nargs="*", default=[], metavar="KEY=VALUE", help="sampling.langevin changes")
    parser.add_argument("--out", type=Path, help="output folder (default <run>/samples/<checkpoint name>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", action="store_true", help="also write one PNG per sample")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.n_samples < 1:
        parser.error(f"--n-samples={args.n_samples}: must be >= 1")
    try:
        out = sample(
            args.checkpoint,
            args.n_samples,
            args.mode,
            args.weights,
            _schedule_overrides(args.schedule),
            args.out,
            args.seed,
            args.png,
            args.device,
        )
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    print(f"wrote {args.n_samples} samples to {out}")


if __name__ == "__main__":
    main()
