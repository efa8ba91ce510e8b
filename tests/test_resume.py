"""Runs that survive: exact resume, preemption signals, damaged checkpoints and non-finite steps."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from eblvm.assemble import rebuild
from eblvm.checkpoints import load_checkpoint
from eblvm.errors import ConfigError, DivergenceError, Preempted
from eblvm.run import run
from tests.conftest import FAST_RUN, ROOT, compose_train_config

STEPS = 40
RESUMABLE = FAST_RUN + [f"trainer.max_steps={STEPS}", "trainer.val_check_interval=10", "test_checkpoint=last"]
NAN_OBJECTIVE = ["objective=dsm", "objective._target_=tests.nan_objective.NaNAtSteps"]


def metric_rows(run_dir) -> list[dict[str, str]]:
    """metrics.csv without wall-clock columns, which differ between any two runs."""
    with open(run_dir / "metrics.csv", newline="") as file:
        return [{k: v for k, v in row.items() if "seconds" not in k} for row in csv.DictReader(file)]


def final_state(run_dir) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.ckpt")


def assert_resumes_exactly(tmp_path, overrides: list[str], stop_step: int, steps: int = STEPS) -> None:
    """A run of ``overrides`` (ending at ``steps``) interrupted by SIGUSR1 at ``stop_step`` and resumed ends with the
    same weights, optimizer and scheduler states, noise states, metrics and test objective as the run straight
    through."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run(compose_train_config(straight, overrides))

    signal_at = ["+callbacks.interrupt._target_=tests.interrupt.SignalAtStep", f"+callbacks.interrupt.step={stop_step}"]
    with pytest.raises(Preempted) as stopped:
        run(compose_train_config(interrupted, overrides + signal_at))
    assert stopped.value.step == stop_step and stopped.value.signal_name == "SIGUSR1"
    assert final_state(interrupted)["global_step"] == stop_step
    run(compose_train_config(interrupted, overrides + ["auto_resume=true"]))

    expected, resumed = final_state(straight), final_state(interrupted)
    assert resumed["global_step"] == expected["global_step"] == steps
    torch.testing.assert_close(resumed["state_dict"], expected["state_dict"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["optimizer_states"], expected["optimizer_states"], rtol=0, atol=0)
    assert resumed["lr_schedulers"] == expected["lr_schedulers"]
    torch.testing.assert_close(resumed["eblvm_generator_states"], expected["eblvm_generator_states"], rtol=0, atol=0)
    if "current_model_state" in expected:  # EMA: the raw weights too
        torch.testing.assert_close(resumed["current_model_state"], expected["current_model_state"], rtol=0, atol=0)
    assert metric_rows(interrupted) == metric_rows(straight)
    straight_summary = json.loads((straight / "summary.json").read_text())
    resumed_summary = json.loads((interrupted / "summary.json").read_text())
    assert resumed_summary["test/objective"] == straight_summary["test/objective"]


@pytest.mark.parametrize(
    ("overrides", "stop_step"),
    [([], 15), (["objective=pcd", "ema_decay=0.9"], 20), (["objective=vages"], 15)],
    ids=["bism-between-validations", "pcd-ema-at-a-validation", "vages-between-validations"],
)
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path, overrides, stop_step):
    assert_resumes_exactly(tmp_path, RESUMABLE + overrides, stop_step)


def test_ckpt_path_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path=.*no such file"):
        run(compose_train_config(tmp_path, FAST_RUN + [f"ckpt_path={tmp_path / 'nowhere.ckpt'}"]))


def test_truncated_checkpoint_is_refused_with_a_clear_error(tmp_path):
    first = tmp_path / "first"
    run(compose_train_config(first, FAST_RUN))
    damaged = tmp_path / "damaged.ckpt"
    content = (first / "checkpoints" / "last.ckpt").read_bytes()
    damaged.write_bytes(content[: len(content) // 2])
    with pytest.raises(ConfigError, match="ckpt_path=.*damaged.ckpt.*truncated or corrupt"):
        run(compose_train_config(tmp_path / "second", FAST_RUN + [f"ckpt_path={damaged}"]))
    assert not (tmp_path / "second" / "checkpoints").exists(), "nothing is trained from a damaged checkpoint"

    shutil.copy(damaged, first / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match="checkpoint=.*truncated or corrupt"):
        rebuild(first)


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_a_signal_to_a_training_process_checkpoints_and_exits_with_the_documented_code(tmp_path, signal_name):
    overrides = [*FAST_RUN, "trainer.max_steps=1000000", "trainer.val_check_interval=20", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "train.py", *overrides], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    last = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.is_file() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert last.is_file(), process.communicate()[0]
    process.send_signal(getattr(signal, signal_name))
    output, _ = process.communicate(timeout=120)

    assert process.returncode == 4, output
    outcome = json.loads((tmp_path / "outcome.json").read_text())
    assert outcome["status"] == "preempted" and signal_name in outcome["message"]
    stopped_at = load_checkpoint(last)["global_step"]
    assert stopped_at == outcome["step"] > 0

    more = [*FAST_RUN, f"trainer.max_steps={stopped_at + 5}", f"hydra.run.dir={tmp_path}", "auto_resume=true"]
    resumed = subprocess.run([sys.executable, "train.py", *more], cwd=ROOT, env=env, text=True, capture_output=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == stopped_at + 5
    assert json.loads((tmp_path / "outcome.json").read_text())["status"] == "ok"


def test_nan_at_step_k_stops_there_and_keeps_the_checkpoint_from_before(tmp_path):
    cfg = compose_train_config(tmp_path, RESUMABLE + NAN_OBJECTIVE + ["+objective.nan_steps=[15]"])
    with pytest.raises(DivergenceError, match="at step 15: higher loss is nan"):
        run(cfg)
    checkpoint = final_state(tmp_path)
    assert checkpoint["global_step"] == 10
    assert all(torch.isfinite(value).all() for value in checkpoint["state_dict"].values())


def test_skip_policy_drops_non_finite_steps_and_counts_them(tmp_path):
    cfg = compose_train_config(
        tmp_path,
        RESUMABLE
        + NAN_OBJECTIVE
        + ["+objective.nan_steps=[5,6,7]", "on_nonfinite=skip", "trainer.log_every_n_steps=5"],
    )
    summary = run(cfg)
    assert summary["steps"] == STEPS, "dropped iterations do not count as steps"
    assert final_state(tmp_path)["eblvm_skipped_steps"] == (3, 0)
    skipped = [float(row["train/skipped_steps"]) for row in metric_rows(tmp_path) if row.get("train/skipped_steps")]
    assert skipped and skipped[-1] == 3


def test_skip_policy_stops_after_too_many_in_a_row(tmp_path):
    nan_steps = "[" + ",".join(map(str, range(5, 100))) + "]"
    overrides = ["on_nonfinite=skip", "max_consecutive_skips=4", f"+objective.nan_steps={nan_steps}"]
    with pytest.raises(DivergenceError, match="4 non-finite iterations in a row"):
        run(compose_train_config(tmp_path, RESUMABLE + NAN_OBJECTIVE + overrides))


@pytest.mark.parametrize(
    ("override", "message"),
    [("on_nonfinite=ignore", "on_nonfinite='ignore': must be one of stop, skip"),
     ("max_consecutive_skips=0", "max_consecutive_skips=0: must be an integer >= 1")],
)  # fmt: skip
def test_bad_divergence_policy_is_named(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run(compose_train_config(tmp_path, FAST_RUN + [override]))
