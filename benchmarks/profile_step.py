"""Where a default training iteration spends its time: a Python profile and an operator profile of the real step.

    python benchmarks/profile_step.py                 # 300 iterations of the default run (about a minute)
    python benchmarks/profile_step.py --steps 100 overrides...   # e.g. objective.n_unroll=0

The run is the default config (``python train.py``'s model, posterior, objective and data) trained through
Lightning with no validation, logging or checkpoints, after 20 warm-up iterations. Printed:

- cProfile: cumulative seconds of the step's parts (the lower steps, the unroll, the higher loss and its backward,
  the optimizer steps, data loading and Lightning's own loop), per iteration;
- torch.profiler: the operators by self CPU time and the number of operator calls per iteration, the count that
  sets the cost of these small models (each call costs microseconds of dispatch whatever its size).

The profilers slow Python-heavy code more than operator-heavy code: compare parts with each other, and take
timings from ``bench_default_run.py`` and ``bench_iteration.py``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tempfile  # noqa: E402

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import open_dict  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import eblvm.config  # noqa: E402, F401  (registers the schema conf/train.yaml names first)
from benchmarks.timing import quiet_trainer  # noqa: E402
from eblvm.assemble import assemble  # noqa: E402

# The step's parts, as (label, function name in the profile).
PARTS = [
    ("training_step (all of it)", "training_step"),
    ("  lower steps", "_lower_level"),
    ("  unroll", "unroll"),
    ("  lower loss (lower steps + unroll)", "lower_loss"),
    ("  higher loss forward", "higher_loss"),
    ("  backward passes", "backward"),
    ("  optimizer steps", "step"),
    ("  finiteness check", "_finite"),
    ("data loading", "__next__"),
]


def default_module(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = tempfile.mkdtemp(prefix="eblvm_profile_")
        del cfg.hydra
    parts = assemble(cfg)
    return parts.module(cfg), parts.datamodule


def fit(steps: int, overrides: list[str]) -> None:
    torch.manual_seed(0)
    module, datamodule = default_module(overrides)
    quiet_trainer("cpu", steps, []).fit(module, datamodule.train_dataloader())


def cumulative_seconds(stats: pstats.Stats, function: str) -> float:
    """The cumulative time of every profiled function of this name in eblvm, Lightning's module or torch's
    autograd and optimizers (the largest such entry)."""
    best = 0.0
    for (file, _, name), (_, _, _, cumulative, _) in stats.stats.items():
        if name == function and ("eblvm" in file or "torch" in file or "lightning" in file):
            best = max(best, cumulative)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("overrides", nargs="*", help="config overrides, as for train.py")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fit(20, args.overrides)  # warm-up: first-call costs are not the step's

    profiler = cProfile.Profile()
    profiler.enable()
    fit(args.steps, args.overrides)
    profiler.disable()
    stats = pstats.Stats(profiler)
    print(f"cProfile, {args.steps} iterations of the default run: ms per iteration (profiled)")
    for label, function in PARTS:
        print(f"  {label:<36} {1000 * cumulative_seconds(stats, function) / args.steps:>8.2f}")

    with profile(activities=[ProfilerActivity.CPU]) as operators:
        fit(args.steps, args.overrides)
    averages = operators.key_averages()
    calls = sum(event.count for event in averages if event.key.startswith("aten::"))
    print(f"\ntorch.profiler: {calls / args.steps:.0f} aten operator calls per iteration")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=45))


if __name__ == "__main__":
    main()
