"""Images per second of one BiMDSM training iteration with the paper's deep networks, and one Langevin step.

    python benchmarks/bench_images.py                      # MNIST and CIFAR-10 networks on this machine's CPU
    python benchmarks/bench_images.py --device cuda        # on a GPU, with peak GPU memory
    python benchmarks/bench_images.py --nets mnist --steps 3

Networks (docs/methods.md §2.2, §7): MNIST, ResNet6 C=64 on 1x32x32; CIFAR-10, ResNet9 C=128 on 3x32x32; h_dim 50,
Gaussian conv posterior. One iteration = K=5 posterior-Fisher lower steps + the BiMDSM energy step (N=0), batch
100 of random images, through Lightning as in training. A Langevin step is one gradient of E(v, h) in v at the
batch size plus the update (via-q mode, h fixed). Each network runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NETS = {
    "mnist": {"image_shape": (1, 32, 32), "channels": 64, "depth": "resnet6", "grid": ("geometric", 0.1, 3.0)},
    "cifar10": {"image_shape": (3, 32, 32), "channels": 128, "depth": "resnet9", "grid": ("linear", 0.05, 1.2)},
}


def measure(net: str, steps: int, warmup: int, batch: int, langevin_steps: int, device: str) -> dict:
    import pytorch_lightning as pl
    import torch

    from benchmarks.timing import BatchTimer, max_rss_mb, peak_memory_mb, quiet_trainer, synchronize
    from eblvm.bilevel.module import BilevelModule, EvalConfig
    from eblvm.bilevel.optim import OptimConfig
    from eblvm.models import LatentEBM
    from eblvm.objectives import ScoreMatching
    from eblvm.posteriors import GaussianConvPosterior
    from eblvm.sampling import LangevinSchedule, langevin_sample

    pl.seed_everything(0, verbose=False)
    spec = NETS[net]
    grid, sigma_begin, sigma_end = spec["grid"]
    model = LatentEBM(spec["image_shape"], h_dim=50, channels=spec["channels"], depth=spec["depth"])
    posterior = GaussianConvPosterior(spec["image_shape"], h_dim=50)
    objective = ScoreMatching(
        higher="mdsm", estimator="bism", lower="fisher", noise_grid=grid, sigma_begin=sigma_begin,
        sigma_end=sigma_end, sigma0=0.1, n_lower_steps=5, n_unroll=0,
    )  # fmt: skip
    module = BilevelModule(model, posterior, objective, OptimConfig(lr=1e-4), EvalConfig(), seed=0)
    data = torch.rand(batch * (steps + warmup), model.v_dim)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True)
    timer = BatchTimer(device)
    baseline_mb = max_rss_mb()
    quiet_trainer(device, steps + warmup, [timer], devices=1).fit(module, loader)
    train_peak_mb = peak_memory_mb(device, baseline_mb)
    seconds = statistics.median(timer.durations[warmup:])

    model, posterior = module.model.to(device), module.posterior.to(device)
    plain = LangevinSchedule(hot_steps=langevin_steps, hot_temperature=1.0, anneal_steps=0, cool_steps=0,
                             denoise_sigma=None)  # fmt: skip
    reference = data[:batch].to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    warm_up = LangevinSchedule(hot_steps=2, anneal_steps=0, cool_steps=0)
    langevin_sample(model, "via_q", batch, warm_up, generator, posterior, reference)
    synchronize(device)
    start = time.perf_counter()
    langevin_sample(model, "via_q", batch, plain, generator, posterior, reference)
    synchronize(device)
    step_ms = 1000 * (time.perf_counter() - start) / langevin_steps
    return {
        "net": net,
        "device": device,
        "batch": batch,
        "seconds_per_iteration": seconds,
        "images_per_second": batch / seconds,
        "train_peak_mb": train_peak_mb,
        "langevin_ms_per_step": step_ms,
        "langevin_full_schedule_s": step_ms * 2700 / 1000,
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS))
    parser.add_argument("--steps", type=int, default=3, help="timed training iterations (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--langevin-steps", type=int, default=10)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(measure(args.single, args.steps, args.warmup, args.batch, args.langevin_steps, args.device)))
        return
    memory = "peak GPU MiB" if args.device == "cuda" else "peak RSS growth MiB"
    print(f"BiMDSM K=5 N=0, batch {args.batch}, device {args.device}: median of {args.steps} iterations")
    columns = f"{'params':>8} {'s/iter':>8} {'img/s':>8} {memory:>20} {'Langevin ms/step':>17} {'2700 steps':>11}"
    print(f"{'net':<8} {columns}")
    for net in args.nets:
        command = [sys.executable, __file__, "--single", net, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--batch", str(args.batch), "--langevin-steps", str(args.langevin_steps),
                   "--device", args.device]  # fmt: skip
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(
            f"{net:<8} {result['parameters_m']:>7.1f}M {result['seconds_per_iteration']:>8.2f} "
            f"{result['images_per_second']:>8.1f} {result['train_peak_mb']:>20.0f} "
            f"{result['langevin_ms_per_step']:>17.1f} {result['langevin_full_schedule_s']:>10.0f}s"
        )


if __name__ == "__main__":
    main()
