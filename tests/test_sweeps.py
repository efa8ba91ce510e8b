"""Multiruns: the outcome table of a sweep, the Optuna sweep, and the launchers (joblib, submitit local, SLURM)."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from eblvm.sweeps import SweepOutcomes, main
from tests.conftest import FAST_RUN, ROOT

# The divergence test objective (tests/nan_objective.py): DSM whose training loss is NaN at the listed steps.
NAN_OBJECTIVE = ["objective=dsm", "objective._target_=tests.nan_objective.NaNAtSteps"]
# Jobs in <sweep dir>/<job number>: with FAST_RUN's overrides, Hydra's default <number>_<overrides> directory name
# goes over the file system's 255-byte limit.
NUMBERED_JOB_DIRS = "hydra.sweep.subdir=${hydra.job.num}"


def train(*overrides: str, cwd: Path = ROOT, script: str = "train.py") -> subprocess.CompletedProcess:
    """``python train.py <overrides>`` as a user runs it, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(
        [sys.executable, script, *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def outcomes_of(sweep_dir: Path) -> list[dict]:
    """The entries of ``<sweep_dir>/outcomes.json``."""
    return json.loads((sweep_dir / "outcomes.json").read_text())


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    """The config of ``python train.py -m <overrides>``, with its ``hydra`` node (launcher and sweeper settings)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def write_job(job_dir: Path, overrides: list[str], outcome: dict | None, summary: dict | None = None) -> None:
    """A job directory as Hydra and train.py leave it; ``outcome`` None: a job killed before its end."""
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if outcome is not None:
        (job_dir / "outcome.json").write_text(json.dumps(outcome))
    if summary is not None:
        (job_dir / "summary.json").write_text(json.dumps(summary))


OK = {"status": "ok", "exit_code": 0, "message": "", "step": None}


def test_sweep_outcomes_lists_every_job_in_job_order_and_marks_unfinished_ones_missing(tmp_path, caplog):
    write_job(tmp_path / "0_seed=1", ["seed=1"], OK)
    diverged = {"status": "diverged", "exit_code": 3, "message": "training diverged at step 3: loss is nan", "step": 3}
    write_job(tmp_path / "2_seed=2", ["seed=2"], diverged)
    write_job(tmp_path / "10_seed=3", ["seed=3"], None)
    (tmp_path / ".submitit" / "123").mkdir(parents=True)  # submitit's logs: no job there
    (tmp_path / "multirun.yaml").write_text("{}")

    with caplog.at_level(logging.INFO, logger="eblvm.sweeps"):
        SweepOutcomes().on_multirun_end(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))

    missing = "no outcome.json: killed before its end, or still running"
    assert outcomes_of(tmp_path) == [
        {"job_dir": "0_seed=1", "overrides": ["seed=1"], **OK, "metrics": {}},
        {"job_dir": "2_seed=2", "overrides": ["seed=2"], **diverged, "metrics": {}},
        {"job_dir": "10_seed=3", "overrides": ["seed=3"], "status": "missing", "exit_code": None, "message": missing,
         "step": None, "metrics": {}},
    ]  # fmt: skip
    assert (tmp_path / "outcomes.md").read_text() == textwrap.dedent(f"""\
        3 jobs: 1 ok, 1 diverged, 1 missing

        | job | status | exit code | step | overrides | message |
        | --- | --- | --- | --- | --- | --- |
        | 0_seed=1 | ok | 0 |  | `seed=1` |  |
        | 2_seed=2 | diverged | 3 | 3 | `seed=2` | training diverged at step 3: loss is nan |
        | 10_seed=3 | missing |  |  | `seed=3` | {missing} |

        mean ± std over seeds, for each setting of the other overrides:

        | overrides | seeds |
        | --- | --- |
        | (none) | 1 of 3 finished |
        """)
    assert f"sweep outcomes: 3 jobs: 1 ok, 1 diverged, 1 missing ({tmp_path / 'outcomes.md'})" in caplog.messages


def test_sweep_outcomes_show_each_jobs_test_metrics_and_their_mean_over_seeds(tmp_path):
    """``-m objective.n_unroll=0,5 seed=1,2``: the last job diverged, so one seed of N=5 is averaged; the summary.json
    left in its directory by an earlier finished run is not read."""
    summaries = [
        {"steps": 30, "ms_per_step": 2.0, "test/log_likelihood": -1.0, "test/log_likelihood_stderr": 0.05,
         "test/sm_objective": -3.0, "test/objective": 7.0},
        {"steps": 30, "ms_per_step": 4.0, "test/log_likelihood": -2.0, "test/log_likelihood_stderr": 0.0,
         "test/sm_objective": -4.0},
        {"steps": 20, "ms_per_step": 3.0, "test/log_likelihood": -0.5, "test/sm_objective": -5.0},
        {"steps": 30, "ms_per_step": 1.0, "test/log_likelihood": 9.0, "test/sm_objective": 9.0},
    ]  # fmt: skip
    diverged = {"status": "diverged", "exit_code": 3, "message": "training diverged at step 12", "step": 12}
    for job, (summary, outcome) in enumerate(zip(summaries, [OK, OK, OK, diverged], strict=True)):
        overrides = [f"objective.n_unroll={5 * (job // 2)}", f"seed={1 + job % 2}"]
        write_job(tmp_path / str(job), overrides, outcome, summary)

    main([str(tmp_path)])

    assert (tmp_path / "outcomes.md").read_text() == textwrap.dedent("""\
        4 jobs: 3 ok, 1 diverged

        | job | status | exit code | step | log-likelihood | SM objective | ms / step | overrides | message |
        | --- | --- | --- | --- | --- | --- | --- | --- | --- |
        | 0 | ok | 0 | 30 | -1.000 ± 0.050 | -3.000 | 2.00 | `objective.n_unroll=0 seed=1` |  |
        | 1 | ok | 0 | 30 | -2.000 | -4.000 | 4.00 | `objective.n_unroll=0 seed=2` |  |
        | 2 | ok | 0 | 20 | -0.500 | -5.000 | 3.00 | `objective.n_unroll=5 seed=1` |  |
        | 3 | diverged | 3 | 12 |  |  |  | `objective.n_unroll=5 seed=2` | training diverged at step 12 |

        mean ± std over seeds, for each setting of the other overrides:

        | overrides | seeds | log-likelihood | SM objective | ms / step |
        | --- | --- | --- | --- | --- |
        | `objective.n_unroll=0` | 2 | -1.500 ± 0.707 | -3.500 ± 0.707 | 3.00 ± 1.41 |
        | `objective.n_unroll=5` | 1 of 2 finished | -0.500 | -5.000 | 3.00 |
        """)
    outcomes = outcomes_of(tmp_path)
    assert outcomes[0]["metrics"] == {"test/log_likelihood": -1.0, "test/sm_objective": -3.0, "ms_per_step": 2.0,
                                      "test/log_likelihood_stderr": 0.05}  # fmt: skip
    assert [outcome["step"] for outcome in outcomes] == [30, 30, 20, 12]
    assert outcomes[3]["metrics"] == {}


def test_outcome_files_can_be_written_after_the_sweep(tmp_path, capsys):
    """``python -m eblvm.sweeps <sweep dir>``: for a sweep that ended before its callback ran."""
    write_job(tmp_path / "0", [], {"status": "preempted", "exit_code": 4, "message": "SIGTERM received", "step": 7})
    main([str(tmp_path)])
    assert capsys.readouterr().out == f"1 job: 1 preempted: {tmp_path / 'outcomes.md'}\n"
    assert outcomes_of(tmp_path)[0]["step"] == 7


def test_optuna_study_goes_on_past_a_trial_that_returns_none(tmp_path):
    """A failed multirun job returns None (train.py): the Optuna sweeper records a failed trial and goes on."""
    app = tmp_path / "app.py"
    app.write_text(
        textwrap.dedent("""\
            import hydra

            @hydra.main(config_path=None, config_name=None, version_base="1.3")
            def main(cfg):
                return None if cfg.x > 0.5 else cfg.x

            main()
            """)
    )
    sweep = [
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.sampler.seed=1",  # draws x = 0.42, 0.72 (None), 0.0001, 0.30
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.max_failure_rate=1.0",
        "+x=interval(0, 1)",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    result = train(*sweep, cwd=tmp_path, script="app.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Failed experiment" in result.stdout + result.stderr
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(1.1437e-4, rel=1e-3)


def test_multirun_goes_on_past_a_diverged_job_and_records_both(tmp_path):
    result = train(
        "-m",
        *FAST_RUN,
        *NAN_OBJECTIVE,
        "+objective.nan_steps=[3],[1000]",
        f"hydra.sweep.dir={tmp_path}",
        NUMBERED_JOB_DIRS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = outcomes_of(tmp_path)
    assert [(o["job_dir"], o["status"], o["exit_code"], o["step"]) for o in outcomes] == [
        ("0", "diverged", 3, 3),
        ("1", "ok", 0, 30),
    ]
    assert "+objective.nan_steps=[3]" in outcomes[0]["overrides"]
    assert "+objective.nan_steps=[1000]" in outcomes[1]["overrides"]
    assert (tmp_path / "1" / "summary.json").is_file()
    table = (tmp_path / "outcomes.md").read_text()
    assert "2 jobs: 1 ok, 1 diverged" in table
    assert " | 0 of 1 finished |  |  |  |\n" in table  # the diverged job's own setting: nothing averaged
    assert set(outcomes[1]["metrics"]) >= {"test/log_likelihood", "test/sm_objective", "ms_per_step"}


def test_optuna_sweep_config_searches_bism_and_records_failed_trials():
    cfg = compose_with_hydra(["sweep=optuna_bism"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert (sweeper.direction, sweeper.storage, sweeper.n_trials, sweeper.n_jobs) == ("maximize", None, 20, 1)
    assert sweeper.sampler.seed is not None and sweeper.max_failure_rate == 1.0
    assert dict(sweeper.params) == {
        "optim.lr": "tag(log, interval(1e-4, 1e-2))",
        "optim.posterior_lr": "tag(log, interval(1e-4, 1e-2))",
        "objective.sigma": "tag(log, interval(0.01, 0.3))",
        "objective.n_lower_steps": "choice(0, 1, 5, 10)",
    }
    assert cfg.optimized_metric == "test/log_likelihood" and cfg.objective.estimator == "bism"
    callbacks = {node._target_ for node in cfg.hydra.callbacks.values()}
    assert callbacks == {"eblvm.sweeps.SweepOutcomes"}


def test_optuna_sweep_runs_its_trials_and_writes_the_best_one(tmp_path):
    result = train("-m", "sweep=optuna_bism", "hydra.sweeper.n_trials=2", *FAST_RUN, f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"optim.lr", "optim.posterior_lr", "objective.sigma", "objective.n_lower_steps"}
    assert math.isfinite(best["best_value"])
    values = [json.loads((tmp_path / o["job_dir"] / "summary.json").read_text()) for o in outcomes_of(tmp_path)]
    assert best["best_value"] == max(v["test/log_likelihood"] for v in values)


@pytest.mark.parametrize(
    ("trainer", "gpus"), [(["trainer=gpu"], 1), (["trainer=ddp", "trainer.devices=4"], 4)], ids=["gpu", "ddp4"]
)
def test_slurm_launcher_asks_one_task_per_gpu_and_resumes_after_a_requeue(tmp_path, trainer, gpus):
    cfg = compose_with_hydra(["launcher=slurm", *trainer, f"hydra.sweep.dir={tmp_path}"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == gpus
    assert (launcher["timeout_min"], launcher["signal_delay_s"], launcher["max_num_timeout"]) == (240, 120, 3)
    assert cfg.auto_resume is True
    (environment,) = instantiate(cfg.trainer.plugins)
    assert type(environment).__name__ == "SLURMEnvironment" and environment.auto_requeue is False


class _Submitted(Exception):
    """Raised instead of calling sbatch."""


def test_slurm_launcher_writes_an_sbatch_script_with_one_task_per_gpu(tmp_path):
    """The real launcher builds its submitit executor; sbatch is not called, its script is kept."""
    from submitit.slurm.slurm import SlurmExecutor

    cfg = compose_with_hydra(["launcher=slurm", "trainer=ddp", "trainer.devices=4", f"hydra.sweep.dir={tmp_path}"])
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda job_cfg: None, config=cfg)
    scripts = []

    def keep_script(executor, command):
        scripts.append(executor._make_submission_file_text(command, "test"))
        raise _Submitted

    with (
        mock.patch.object(SlurmExecutor, "affinity", return_value=2),  # as if srun were installed
        mock.patch.object(SlurmExecutor, "_submit_command", keep_script),
        pytest.raises(_Submitted),
    ):
        launcher.launch([["seed=1"], ["seed=2"]], initial_job_idx=0)
    lines = set(scripts[0].splitlines())
    expected = {
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=32GB",
        "#SBATCH --time=240",
        "#SBATCH --signal=USR2@120",  # submitit's timeout warning (its default signal), 120 s before the limit
        "#SBATCH --array=0-1%2",  # a job array of the 2 jobs, both at once
    }
    assert expected <= lines, scripts[0]


@pytest.mark.parametrize("auto_requeue", [False, True])
def test_lightning_requeue_handler_only_when_auto_requeue(monkeypatch, auto_requeue):
    """The slurm launcher's SLURMEnvironment(auto_requeue=False) keeps Lightning off SIGUSR1 (its requeue signal)."""
    import pytorch_lightning as pl
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "1234", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
                        "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, plugins=[SLURMEnvironment(auto_requeue=auto_requeue)], logger=False
    )
    before = signal.getsignal(signal.SIGUSR1)
    trainer._signal_connector.register_signal_handlers()
    try:
        assert (signal.getsignal(signal.SIGUSR1) is not before) == auto_requeue
    finally:
        trainer._signal_connector.teardown()
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_job_in_its_own_process(tmp_path):
    result = train("-m", "launcher=submitit_local", *FAST_RUN, f"hydra.sweep.dir={tmp_path}", NUMBERED_JOB_DIRS)
    assert result.returncode == 0, result.stderr[-3000:]
    (outcome,) = outcomes_of(tmp_path)
    assert outcome["status"] == "ok"
    assert list((tmp_path / ".submitit").glob("*/*_0_log.out")), "the job ran through submitit"
    assert "auto_resume: true" in (tmp_path / outcome["job_dir"] / "config.yaml").read_text()


@pytest.mark.slow
def test_local_parallel_launcher_runs_jobs_in_worker_processes(tmp_path):
    result = train(
        "-m", "launcher=local_parallel", *FAST_RUN, "seed=1,2", f"hydra.sweep.dir={tmp_path}", NUMBERED_JOB_DIRS
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [o["status"] for o in outcomes_of(tmp_path)] == ["ok", "ok"]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
