"""Running a study (several methods, each a Hydra multirun over seeds) and collecting its runs' results."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from eblvm.aggregate import read_summary
from eblvm.assemble import rebuild
from eblvm.errors import require
from eblvm.models.base import EnergyModel

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Method:
    """One row of a study: a name, the ``train.py`` overrides that select it, and its cost per training step
    relative to the study's other methods (a study starts its costliest methods first)."""

    name: str
    overrides: tuple[str, ...]
    cost: float = 1.0


def threads_per_job(jobs: int) -> int:
    """The threads each of ``jobs`` side-by-side jobs uses: ``OMP_NUM_THREADS`` when it is set (several studies
    sharing the machine), else ``cores / jobs``; small models gain nothing from more, and jobs side by side must
    not oversubscribe the cores."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if not configured:
        return max(1, (os.cpu_count() or 1) // jobs)
    outer = configured.split(",")[0]  # a nested setting "4,2" gives the outer level's threads
    require(outer.isdigit() and int(outer) >= 1, "OMP_NUM_THREADS", configured, "must be a thread count >= 1")
    return int(outer)


def _run_all(commands: dict[str, tuple[list[str], Path]], jobs: int, costs: dict[str, float]) -> float:
    """Run each named ``train.py`` command (its output folder beside it), ``jobs`` side by side, each with
    ``threads_per_job(jobs)`` threads, the costliest first (longest first keeps the last job from running alone
    while the other queues sit idle); a failure is reported with its log file and stops the study. Returns the
    wall-clock seconds."""
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_job(jobs))}

    def run_one(name: str) -> None:
        command, out = commands[name]
        out.mkdir(parents=True, exist_ok=True)
        log = out / "study.log"
        with log.open("w") as handle:
            result = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)
        status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode}, see {log})"
        print(f"  {name:<14} {status}", flush=True)
        if result.returncode:
            raise RuntimeError(f"{name} failed: see {log}")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(run_one, sorted(commands, key=lambda name: -costs[name])))
    return time.perf_counter() - start


def launch(
    methods: Sequence[Method], common: Sequence[str], seeds: Sequence[int], runs_dir: Path, jobs: int = 1
) -> float:
    """Run every method as ``train.py -m <overrides> <common> seed=<seeds>`` into ``runs_dir/<method>/seed_<s>``
    (or the ``hydra.sweep.subdir`` a method's overrides name): one process per run, ``jobs`` methods side by side.
    Returns the wall-clock seconds."""
    commands = {}
    for method in methods:
        out = runs_dir / method.name
        command = [
            sys.executable, str(ROOT / "train.py"), "-m", *method.overrides, *common,
            f"seed={','.join(map(str, seeds))}", f"hydra.sweep.dir={out}",
        ]  # fmt: skip
        if not any(override.startswith("hydra.sweep.subdir=") for override in method.overrides):
            command.append("hydra.sweep.subdir=seed_${seed}")
        commands[method.name] = (command, out)
    return _run_all(commands, jobs, {method.name: method.cost for method in methods})


def launch_ensembles(
    methods: Sequence[Method], common: Sequence[str], seeds: Sequence[int], runs_dir: Path, jobs: int = 1
) -> float:
    """Run every method's ``seeds`` as one ensemble, ``train.py <overrides> <common> ensemble.size=<S>
    ensemble.seeds=<seeds>``, into ``runs_dir/<method>`` (its members in ``members/<k>/``), ``jobs`` methods side
    by side. Returns the wall-clock seconds."""
    commands = {}
    for method in methods:
        out = runs_dir / method.name
        command = [sys.executable, str(ROOT / "train.py"), *method.overrides, *common, f"seed={seeds[0]}"]
        if len(seeds) > 1:
            command += [f"ensemble.size={len(seeds)}", f"ensemble.seeds=[{','.join(map(str, seeds))}]"]
        command.append(f"hydra.run.dir={out}")
        commands[method.name] = (command, out)
    return _run_all(commands, jobs, {method.name: method.cost for method in methods})


def collect(method_dir: Path) -> list[dict]:
    """The ``summary.json`` of every finished run under ``method_dir`` (runs of a multirun, or an ensemble's
    members), each with its ``seed`` and ``run_dir``."""
    runs = []
    single = [method_dir / "summary.json"] if "members" not in read_summary(method_dir) else []  # a run alone
    summary_files = [*single, *method_dir.glob("*/summary.json"), *method_dir.glob("members/*/summary.json")]
    for summary_file in sorted(file for file in summary_files if file.is_file()):
        summary = read_summary(summary_file.parent)
        config = yaml.safe_load((summary_file.parent / "config.yaml").read_text())
        runs.append({**summary, "seed": config["seed"], "run_dir": str(summary_file.parent), "config": config})
    return runs


def load_model(run_dir: str | Path, checkpoint: str = "best.ckpt") -> EnergyModel:
    """The model saved in a run's ``checkpoints/<checkpoint>``, rebuilt from the config it carries."""
    return rebuild(Path(run_dir) / "checkpoints" / checkpoint).model


def code_version() -> str:
    """The checked-out commit, and whether tracked files differ from it: taken when a study or benchmark starts,
    so that its results name the code that ran its command even if commits land while it runs (for a table
    rebuilt from finished runs, that is the code that rebuilt it; each run's config records its own)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True)
    return f"`{commit.stdout.strip() or 'unknown'}`" + (" (with uncommitted changes)" if dirty.stdout else "")


def provenance(command: str, version: str, seconds: float | None, summed_training_seconds: float | None = None) -> str:
    """A markdown paragraph: the command, the code's ``version`` (``code_version()`` at the start), the machine and
    the run time: the wall-clock ``seconds``, or, where none were timed (a table rebuilt from finished runs), the
    runs' training time summed."""
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"- command: `{command}`\n- commit: {version}\n- machine: {machine}{gpu}\n" + (
        f"- wall-clock time: {seconds / 60:.1f} min\n"
        if seconds is not None
        else f"- training time, summed over runs: {summed_training_seconds / 60:.1f} min\n"
    )
