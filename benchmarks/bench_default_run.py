"""The default run against an older commit, both measured in this run: training ms per step and the whole process.

    git worktree add ../eblvm-68be223 68be223
    python benchmarks/bench_default_run.py --against ../eblvm-68be223            # 2500 steps (about 5 minutes)
    python benchmarks/bench_default_run.py --against ../eblvm-68be223 --steps 600 # quicker

For each checkout, in turn (never side by side: timings need the cores to themselves):

- ``train.py trainer.max_steps=N logger=none`` as a whole process (imports, training, its validations, the test
  and the figures), by wall clock;
- the same run with Lightning's simple profiler: the mean ``run_training_batch`` (one bi-level iteration,
  validation excluded) in ms.

The older checkout runs with this checkout's Python environment.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH_ROW = re.compile(r"\|\s*run_training_batch\s*\|\s*([0-9.e+-]+)\s*\|")


def train(checkout: Path, steps: int, *extra: str) -> tuple[float, str]:
    """Seconds of one ``train.py`` process in ``checkout`` and its combined output."""
    with tempfile.TemporaryDirectory() as run_dir:
        command = [sys.executable, "train.py", f"trainer.max_steps={steps}", "logger=none"]
        command += ["callbacks.progress.refresh_rate=0", f"hydra.run.dir={run_dir}", *extra]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=checkout, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{checkout}: train.py failed\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return seconds, result.stdout + result.stderr


def measure(checkout: Path, steps: int) -> dict[str, float]:
    process_seconds, _ = train(checkout, steps)
    _, report = train(checkout, steps, "+trainer.profiler=simple")
    match = BATCH_ROW.search(report)
    if match is None:
        raise SystemExit(f"{checkout}: no run_training_batch row in the profiler report")
    return {"process_s": process_seconds, "ms_per_step": 1000 * float(match.group(1))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, required=True, help="a checkout (git worktree) of the older commit")
    parser.add_argument("--steps", type=int, default=2500)
    args = parser.parse_args()
    older = measure(args.against.resolve(), args.steps)
    newer = measure(ROOT, args.steps)
    print(f"default run, {args.steps} steps, logger=none")
    print(f"{'':<28} {'older':>9} {'this':>9} {'this/older':>11}")
    for key, label in (("ms_per_step", "training ms per step"), ("process_s", "whole process, s")):
        print(f"{label:<28} {older[key]:>9.1f} {newer[key]:>9.1f} {newer[key] / older[key]:>11.2f}")


if __name__ == "__main__":
    main()
