"""Per-member milliseconds per iteration of an ensemble of the default toy run, and its peak memory, by size S.

    python benchmarks/bench_ensemble.py                       # S = 1, 4, 16, 64 (a few minutes on 2 CPU cores)
    python benchmarks/bench_ensemble.py --sizes 1 16 64 256 1024 4096 --device cuda
    python benchmarks/bench_ensemble.py --threads 1           # one intra-op thread per process

The run is ``python train.py``'s default (GRBM 2->4, BiDSM sigma 0.05, K = 5 lower steps, N = 5 unrolled, batch
100), built as ``train.py ensemble.size=S`` builds it and trained through Lightning without evaluation. Each size
runs in its own process, so its peak memory is its own (CPU: growth of the max RSS from just before training;
GPU: max memory allocated). The references are the same run alone (the ordinary single-run module) and the
ensemble of one member, both timed in the same invocation; the ratios are per-member time over each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(size: int, steps: int, warmup: int, device: str, threads: int | None) -> dict:
    """Train ``warmup + steps`` iterations of the default run as an ensemble of ``size`` (0: the run alone); time
    the last ``steps``."""
    import tempfile

    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import eblvm.config  # noqa: F401  (registers the schema)
    from benchmarks.timing import BatchTimer, max_rss_mb, peak_memory_mb, quiet_trainer
    from eblvm.assemble import assemble
    from eblvm.ensemble import assemble_ensemble

    if threads:
        torch.set_num_threads(threads)
    overrides = ["logger=none", f"ensemble.size={max(size, 1)}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = tempfile.mkdtemp()
        del cfg.hydra
    if size == 0:
        parts = assemble(cfg)
        module, datamodule = parts.module(cfg), parts.datamodule
    else:
        parts = assemble_ensemble(cfg)
        module, datamodule = parts.module, parts.datamodule
    timer = BatchTimer(device)
    baseline_mb = max_rss_mb()
    quiet_trainer(device, steps + warmup, [timer], devices=1).fit(module, datamodule)
    timed = timer.durations[warmup:]
    ms = 1000 * statistics.median(timed)
    return {"size": size, "ms_median": ms, "ms_per_member": ms / max(size, 1),
            "peak_mb": peak_memory_mb(device, baseline_mb), "threads": torch.get_num_threads()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--steps", type=int, default=60, help="timed iterations per size")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, help="intra-op threads per process (default: torch's)")
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single is not None:
        print(json.dumps(measure(args.single, args.steps, args.warmup, args.device, args.threads)))
        return
    results = []
    for size in [0, *args.sizes]:
        options = ["--single", str(size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        options += ["--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
        done = subprocess.run([sys.executable, __file__, *options], check=True, capture_output=True, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    alone = results[0]["ms_median"]
    one_member = next((result["ms_median"] for result in results if result["size"] == 1), float("nan"))
    memory = "max RSS growth" if args.device == "cpu" else "max GPU memory allocated"
    print(f"default toy BiDSM K5 N5, median of {args.steps} iterations after {args.warmup}, {args.device}, "
          f"{results[0]['threads']} threads; peak memory = {memory}")  # fmt: skip
    print(f"{'S':>6} {'ms/iteration':>13} {'ms/member':>10} {'per member / alone':>19} {'per member / S=1':>17} "
          f"{'peak MiB':>9}")  # fmt: skip
    for result in results:
        label = "alone" if result["size"] == 0 else str(result["size"])
        ratios = result["ms_per_member"] / alone, result["ms_per_member"] / one_member
        print(f"{label:>6} {result['ms_median']:>13.2f} {result['ms_per_member']:>10.3f} {ratios[0]:>19.4f} "
              f"{ratios[1]:>17.4f} {result['peak_mb']:>9.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
