"""Images per second of one training iteration with the papers' deep networks, and of drawing samples.

    python benchmarks/bench_images.py                      # every network on this machine's CPU
    python benchmarks/bench_images.py --device cuda        # on a GPU, with peak GPU memory
    python benchmarks/bench_images.py --nets mnist bidvl_dcgan --steps 3

BiMDSM networks (docs/methods.md §2.2, §7): MNIST, ResNet6 C=64 on 1x32x32; CIFAR-10, ResNet9 C=128 on 3x32x32;
h_dim 50, Gaussian conv posterior. One iteration = K=5 posterior-Fisher lower steps + the BiMDSM energy step
(N=0); a sampling step is one Langevin step (one gradient of E(v, h) in v at the batch size plus the update, via-q
mode, h fixed). BiDVL networks (§5) at the CIFAR-10 sizes: bidvl_dcgan (SN-CNN energy, DCGAN encoder and
generator, h_dim 100) and bidvl_resnet (SNGAN residual nets, hinge loss, h_dim 128, fresh latent); one iteration
= the energy step then one encoder+generator step; sampling is one generator pass (all a sample needs). Batch 100
of random images, through Lightning as in training; each network runs in its own process.
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
    "bidvl_dcgan": {"image_shape": (3, 32, 32), "h_dim": 100, "residual": False},
    "bidvl_resnet": {"image_shape": (3, 32, 32), "h_dim": 128, "residual": True},
}


def bimdsm_module(spec: dict):
    from eblvm.bilevel.module import BilevelModule
    from eblvm.bilevel.optim import OptimConfig
    from eblvm.models import LatentEBM
    from eblvm.objectives import ScoreMatching
    from eblvm.posteriors import GaussianConvPosterior

    grid, sigma_begin, sigma_end = spec["grid"]
    model = LatentEBM(spec["image_shape"], h_dim=50, channels=spec["channels"], depth=spec["depth"])
    posterior = GaussianConvPosterior(spec["image_shape"], h_dim=50)
    objective = ScoreMatching(
        higher="mdsm", estimator="bism", lower="fisher", noise_grid=grid, sigma_begin=sigma_begin,
        sigma_end=sigma_end, sigma0=0.1, n_lower_steps=5, n_unroll=0,
    )  # fmt: skip
    return BilevelModule(model, posterior, objective, OptimConfig(lr=1e-4), seed=0)


def bidvl_module(spec: dict):
    """The reference networks and settings of experiment=cifar10_bidvl (or cifar10_bidvl_resnet)."""
    from eblvm.bilevel.bidvl import BidvlModule
    from eblvm.bilevel.optim import OptimConfig
    from eblvm.models import DCGANGenerator, ResNetGenerator, SNConvEnergy, SNResNetEnergy
    from eblvm.objectives import BiDVL
    from eblvm.posteriors import GaussianEncoderPosterior

    shape, h_dim, residual = spec["image_shape"], spec["h_dim"], spec["residual"]
    model = SNResNetEnergy(shape) if residual else SNConvEnergy(shape)
    encoder = GaussianEncoderPosterior(shape, h_dim, trunk="resnet" if residual else "dcgan")
    generator = (ResNetGenerator if residual else DCGANGenerator)(h_dim, shape)
    objective = BiDVL(upper="hinge" if residual else "diff", fresh_latent=residual)
    optim = OptimConfig(lr=1e-4, posterior_lr=3e-4, betas=(0.0, 0.9), generator_lr=2e-4 if residual else None)
    return BidvlModule(model, encoder, generator, objective, optim, seed=0)


def sampling_ms_per_step(module, batch: int, data, langevin_steps: int, device: str) -> float:
    """One Langevin step at ``batch`` (BiMDSM, via q), or one generator pass of ``batch`` images (BiDVL)."""
    import torch

    from benchmarks.timing import synchronize
    from eblvm.sampling import LangevinSchedule, langevin_sample

    generator = torch.Generator(device=device).manual_seed(0)
    if module.generator_net is not None:
        net = module.generator_net.to(device).eval()
        latent = torch.randn(batch, net.h_dim, generator=generator, device=device)
        with torch.no_grad():
            net(latent)
            synchronize(device)
            start = time.perf_counter()
            net(latent)
            synchronize(device)
        return 1000 * (time.perf_counter() - start)
    model, posterior = module.model.to(device), module.posterior.to(device)
    plain = LangevinSchedule(hot_steps=langevin_steps, hot_temperature=1.0, anneal_steps=0, cool_steps=0,
                             denoise_sigma=None)  # fmt: skip
    reference = data[:batch].to(device)
    warm_up = LangevinSchedule(hot_steps=2, anneal_steps=0, cool_steps=0)
    langevin_sample(model, "via_q", batch, warm_up, generator, posterior, reference)
    synchronize(device)
    start = time.perf_counter()
    langevin_sample(model, "via_q", batch, plain, generator, posterior, reference)
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / langevin_steps


def measure(net: str, steps: int, warmup: int, batch: int, langevin_steps: int, device: str) -> dict:
    import pytorch_lightning as pl
    import torch

    from benchmarks.timing import BatchTimer, max_rss_mb, peak_memory_mb, quiet_trainer

    pl.seed_everything(0, verbose=False)
    spec = NETS[net]
    module = bidvl_module(spec) if net.startswith("bidvl") else bimdsm_module(spec)
    data = torch.rand(batch * (steps + warmup), module.model.v_dim)
    if module.generator_net is not None:  # BiDVL trains on [-1, 1]
        data = 2 * data - 1
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True)
    timer = BatchTimer(device)
    baseline_mb = max_rss_mb()
    quiet_trainer(device, steps + warmup, [timer], devices=1).fit(module, loader)
    train_peak_mb = peak_memory_mb(device, baseline_mb)
    seconds = statistics.median(timer.durations[warmup:])
    step_ms = sampling_ms_per_step(module, batch, data, langevin_steps, device)
    sample_steps = 1 if module.generator_net is not None else 2700
    return {
        "net": net,
        "device": device,
        "batch": batch,
        "seconds_per_iteration": seconds,
        "images_per_second": batch / seconds,
        "train_peak_mb": train_peak_mb,
        "sampling_ms_per_step": step_ms,
        "sampling_s_per_batch": step_ms * sample_steps / 1000,
        "parameters_m": sum(p.numel() for p in module.model.parameters()) / 1e6,
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
    print(f"batch {args.batch}, device {args.device}: median of {args.steps} iterations")
    print("sampling: one Langevin step (BiMDSM; a sample takes 2700) or one generator pass (BiDVL)")
    columns = f"{'params':>8} {'s/iter':>8} {'img/s':>8} {memory:>20} {'sampling ms/step':>17} {'s/batch':>8}"
    print(f"{'net':<13} {columns}")
    for net in args.nets:
        command = [sys.executable, __file__, "--single", net, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--batch", str(args.batch), "--langevin-steps", str(args.langevin_steps),
                   "--device", args.device]  # fmt: skip
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(
            f"{net:<13} {result['parameters_m']:>7.1f}M {result['seconds_per_iteration']:>8.2f} "
            f"{result['images_per_second']:>8.1f} {result['train_peak_mb']:>20.0f} "
            f"{result['sampling_ms_per_step']:>17.1f} {result['sampling_s_per_batch']:>7.1f}s"
        )


if __name__ == "__main__":
    main()
