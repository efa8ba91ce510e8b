"""Milliseconds per training iteration and peak memory, BiDSM against plain DSM, and the arithmetic floor.

    python benchmarks/bench_iteration.py            # the full table (a few minutes on 2 CPU cores)
    python benchmarks/bench_iteration.py --steps 20 # quicker, noisier
    python benchmarks/bench_iteration.py --table vages  # only VaGES-DSM (L = 2, 5, 10) against BiDSM and DSM

Each measurement runs in its own process so peak memory is its own: on CPU the growth of the max RSS from just
before training (torch's own ~800 MiB excluded), on a GPU the max memory allocated.
Settings: (a) the default toy run (GRBM 2->4, BiDSM sigma 0.05, K=5 lower steps, N=5 unrolled, batch 100);
(b) a Frey-Face-sized GRBM 560->400 with BiDSM sigma 0.3, K=5, N=5, batch 100 on random data.

The arithmetic floor of (b) is the floating-point work of one iteration (``torch.utils.flop_counter``: the matrix
products of every forward and backward pass, the unroll's included) divided by this machine's rate for a
100x560x400 float32 matrix product at the same thread count, both measured in this run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = {
    "toy": {"v_dim": 2, "h_dim": 4, "sigma": 0.05},
    "frey": {"v_dim": 560, "h_dim": 400, "sigma": 0.3},
}


def bench_module(setting: str, estimator: str, n_unroll: int, n_particles: int = 1):
    """The seeded module of ``setting``: a GRBM, a linear relaxed-Bernoulli q and DSM with ``estimator``, K = 5
    (``n_particles`` per particle set for VaGES)."""
    import pytorch_lightning as pl

    from eblvm.bilevel.module import BilevelModule
    from eblvm.bilevel.optim import OptimConfig
    from eblvm.models import GRBM
    from eblvm.objectives import ScoreMatching
    from eblvm.posteriors import RelaxedBernoulliPosterior

    pl.seed_everything(0, verbose=False)
    spec = SETTINGS[setting]
    particles = {"n_particles": n_particles} if estimator == "vages" else {}
    objective = ScoreMatching(
        higher="dsm", estimator=estimator, sigma=spec["sigma"], n_lower_steps=5, n_unroll=n_unroll, **particles
    )
    model = GRBM(spec["v_dim"], spec["h_dim"])
    posterior = RelaxedBernoulliPosterior(spec["v_dim"], spec["h_dim"])
    return BilevelModule(model, posterior, objective, OptimConfig(), seed=0)


def measure(
    setting: str, estimator: str, n_unroll: int, steps: int, warmup: int, device: str, n_particles: int = 1
) -> dict:
    """Train ``warmup + steps`` iterations through Lightning; time the last ``steps``."""
    import torch

    from benchmarks.timing import BatchTimer, max_rss_mb, peak_memory_mb, quiet_trainer

    module = bench_module(setting, estimator, n_unroll, n_particles)
    data = torch.rand(100 * (steps + warmup), SETTINGS[setting]["v_dim"])
    loader = torch.utils.data.DataLoader(data, batch_size=100, shuffle=True, drop_last=True)
    timer = BatchTimer(device)
    baseline_mb = max_rss_mb()  # after imports, model and data
    quiet_trainer(device, steps + warmup, [timer], devices=1).fit(module, loader)
    timed = timer.durations[warmup:]
    peak_mb = peak_memory_mb(device, baseline_mb)
    return {
        "setting": setting,
        "estimator": estimator,
        "n_unroll": n_unroll,
        "ms_median": 1000 * statistics.median(timed),
        "ms_mean": 1000 * statistics.fmean(timed),
        "peak_mb": peak_mb,
        "device": device,
    }


def arithmetic_floor_ms(steps: int) -> dict:
    """(b)'s FLOPs per iteration, the matmul rate of this machine, and their ratio in ms."""
    import time

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.timing import quiet_trainer

    spec = SETTINGS["frey"]
    module = bench_module("frey", "bism", 5)
    loader = torch.utils.data.DataLoader(torch.rand(200, spec["v_dim"]), batch_size=100, drop_last=True)
    counter = FlopCounterMode(display=False)
    trainer = quiet_trainer("cpu", 2, [])
    with counter:
        trainer.fit(module, loader)
    flops = counter.get_total_flops() / 2
    a, b = torch.rand(100, spec["v_dim"]), torch.rand(spec["v_dim"], spec["h_dim"])
    for _ in range(20):
        a @ b
    started, repeats = time.perf_counter(), max(200, 20 * steps)
    for _ in range(repeats):
        a @ b
    rate = repeats * 2 * 100 * spec["v_dim"] * spec["h_dim"] / (time.perf_counter() - started)
    return {"gflop": flops / 1e9, "gflops_per_s": rate / 1e9, "floor_ms": 1000 * flops / rate}


def run_isolated(*options: str) -> dict:
    """This script run in a process of its own with ``options``; the JSON line it prints last."""
    result = subprocess.run([sys.executable, __file__, *options], check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_isolated(
    args: argparse.Namespace, setting: str, estimator: str, n_unroll: int, n_particles: int = 1
) -> dict:
    options = ["--single", setting, estimator, str(n_unroll), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    return run_isolated(*options, "--particles", str(n_particles), "--device", args.device)


def vages_table(args: argparse.Namespace) -> None:
    """VaGES-DSM with L = 2, 5, 10 particles per set (3L drawn per iteration) against BiDSM K5 N5 and DSM."""
    particle_counts = (2, 5, 10)
    print(f"\nms per iteration: VaGES-DSM (K=5, no unroll) against BiDSM K5 N5 and DSM, device {args.device}")
    print(f"{'setting':<8} {'DSM':>8} {'BiDSM':>8} " + " ".join(f"{f'VaGES L={n}':>11}" for n in particle_counts))
    for setting in SETTINGS:
        exact = measure_isolated(args, setting, "exact", 0)["ms_median"]
        bism = measure_isolated(args, setting, "bism", 5)["ms_median"]
        vages = [measure_isolated(args, setting, "vages", 0, n)["ms_median"] for n in particle_counts]
        print(f"{setting:<8} {exact:>8.2f} {bism:>8.2f} " + " ".join(f"{ms:>11.2f}" for ms in vages))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="timed iterations per measurement")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--table", choices=("all", "vages"), default="all", help="all tables, or VaGES's only")
    parser.add_argument("--single", nargs=3, metavar=("SETTING", "ESTIMATOR", "N_UNROLL"), help=argparse.SUPPRESS)
    parser.add_argument("--particles", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor:
        print(json.dumps(arithmetic_floor_ms(args.steps)))
        return
    if args.single:
        setting, estimator, n_unroll = args.single
        result = measure(setting, estimator, int(n_unroll), args.steps, args.warmup, args.device, args.particles)
        print(json.dumps(result))
        return
    if args.table == "vages":
        vages_table(args)
        return

    print(f"ms per iteration (median of {args.steps}, after {args.warmup} warm-up), device {args.device}")
    print(f"{'setting':<8} {'BiDSM K5 N5':>12} {'DSM':>8} {'ratio':>7}")
    bidsm_ms = {}
    for setting in SETTINGS:
        bism = measure_isolated(args, setting, "bism", 5)
        exact = measure_isolated(args, setting, "exact", 0)
        bidsm_ms[setting] = bism["ms_median"]
        ratio = bism["ms_median"] / exact["ms_median"]
        print(f"{setting:<8} {bism['ms_median']:>12.2f} {exact['ms_median']:>8.2f} {ratio:>7.1f}")
    floor = run_isolated("--floor", "--steps", str(args.steps))
    frey = bidsm_ms["frey"]
    print(
        f"\nGRBM 560->400 BiDSM K5 N5: {floor['gflop']:.3f} GFLOP per iteration; matmul rate "
        f"{floor['gflops_per_s']:.1f} GFLOP/s; floor {floor['floor_ms']:.2f} ms; measured {frey:.2f} ms "
        f"= {frey / floor['floor_ms']:.2f} x the floor"
    )
    label = "max RSS growth during training" if args.device == "cpu" else "max GPU memory allocated"
    print(f"\nGRBM 560->400 BiDSM K=5, peak memory ({label}, MiB) and ms per iteration by n_unroll")
    for n_unroll in (0, 1, 5, 10):
        result = measure_isolated(args, "frey", "bism", n_unroll)
        print(f"n_unroll={n_unroll:<3} {result['peak_mb']:>9.1f} MiB {result['ms_median']:>9.2f} ms")
    vages_table(args)


if __name__ == "__main__":
    main()
