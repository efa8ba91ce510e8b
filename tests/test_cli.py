"""The command line as a user runs it: every objective, a multirun sweep, exit codes on bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST_RUN, ROOT

pytestmark = pytest.mark.slow


def train(*overrides: str, wandb_mode: str = "disabled") -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": wandb_mode, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


OBJECTIVES = [
    ["objective=bism"],
    ["objective=bism", "objective.higher=ssm"],
    ["objective=bism", "objective.higher=mdsm"],
    ["objective=bism", "objective.lower=iwae", "objective.n_particles=2"],
    ["objective=bism", "posterior=grbm_exact"],
    ["objective=dsm"],
    ["objective=ssm"],
    ["objective=mdsm"],
    ["objective=sm"],
    ["objective=cd", "objective.k=2"],
    ["objective=pcd"],
    ["objective=nce"],
    ["objective=vnce"],
    ["objective=vages"],
    ["objective=vages", "objective.higher=ksd"],
    ["objective=ksd"],
    ["objective=is_ksd"],
]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=[" ".join(o) for o in OBJECTIVES])
def test_cli_trains_with_every_objective(tmp_path, objective):
    result = train(*FAST_RUN, *objective, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 30
    assert math.isfinite(summary["test/log_likelihood"]) and math.isfinite(summary["test/sm_objective"])


def test_multirun_runs_each_job_in_its_own_directory_with_its_own_wandb_run(tmp_path):
    result = train(
        "-m",
        *FAST_RUN,
        "logger=wandb",  # after FAST_RUN's csv logger: W&B (offline) and metrics.csv
        "objective.n_unroll=0,1",
        f"hydra.sweep.dir={tmp_path}",
        wandb_mode="offline",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(path for path in tmp_path.iterdir() if path.is_dir())
    assert len(jobs) == 2
    for job, n_unroll in zip(jobs, (0, 1), strict=True):
        assert job.name.startswith(f"{n_unroll}_") and f"objective.n_unroll={n_unroll}" in job.name
        assert (job / "summary.json").is_file()
        assert f"n_unroll: {n_unroll}" in (job / "config.yaml").read_text()
        assert len(list((job / "wandb").glob("offline-run-*"))) == 1


def test_a_resumed_run_continues_its_wandb_run(tmp_path):
    overrides = [*FAST_RUN, "logger=wandb", f"hydra.run.dir={tmp_path}"]  # W&B after FAST_RUN's csv logger
    assert train(*overrides, "trainer.max_steps=15", wandb_mode="offline").returncode == 0
    resumed = train(*overrides, "trainer.max_steps=30", "auto_resume=true", wandb_mode="offline")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_id = (tmp_path / "wandb_run_id").read_text()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(f"-{run_id}") for run in runs), runs
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 30


def test_bad_value_exits_2_before_training_and_names_the_key(tmp_path):
    result = train(*FAST_RUN, "objective.n_unroll=-1", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert "objective.n_unroll=-1: must be an integer >= 0" in result.stderr + result.stdout
    assert not Path(tmp_path / "checkpoints").exists()


def test_divergence_exits_3_and_names_the_step(tmp_path):
    result = train(
        *FAST_RUN,
        "optim=sgd",
        "optim.scheduler=step",
        "optim.step_size=20",
        "optim.gamma=1e9",
        "trainer.val_check_interval=10",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 3
    assert "training diverged at step" in result.stderr + result.stdout
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
