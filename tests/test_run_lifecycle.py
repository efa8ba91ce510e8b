"""A run's life after it starts: its final state saved, resumed exactly or refused, evaluated and sampled again
from its checkpoints, and the unroll that trains its posterior."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from eblvm.assemble import rebuild
from eblvm.bilevel.unroll import adam_step, unroll
from eblvm.errors import ConfigError
from eblvm.posteriors.base import Posterior
from eblvm.run import RESUME_CHANGES_FILE, WANDB_ID_FILE, run
from tests.conftest import FAST_DEEP, FAST_RUN, ROOT, compose_train_config

# Fewer posterior steps and gradient-bias repeats than the defaults: the same code paths (real lower steps, the
# unroll, the gradient bias at validation), in less time.
CHEAP = ["objective.n_lower_steps=2", "objective.n_unroll=2", "evaluation.gradient_bias_repeats=2"]
# Four steps validated twice, the final weights tested (so the summary and last.ckpt describe the same weights).
SHORT = [*FAST_RUN, *CHEAP, "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1"]
SHORT += ["test_checkpoint=last"]


pytestmark = pytest.mark.usefixtures("one_thread")


def train(run_dir: Path, overrides: list[str]) -> dict:
    return run(compose_train_config(run_dir, overrides))


def last_ckpt(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str = "") -> None:
    assert actual.keys() == expected.keys(), what
    different = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert different == [], f"{what}: tensors that differ: {different}"


def validations(run_dir: Path) -> int:
    """How many validations a run logged (rows of metrics.csv with a val/objective)."""
    with open(run_dir / "metrics.csv", newline="") as file:
        return sum(1 for row in csv.DictReader(file) if row.get("val/objective"))


def python_module(*args: str) -> subprocess.CompletedProcess:
    """``python -m <args>`` from the repository root, as a user runs the command-line tools."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished four-step run (read only: tests that change a run make their own)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(run_dir, SHORT)
    return run_dir


# --- 4. the final state is saved, and resumes exactly ------------------------------------------------------------

NO_VALIDATION = [*FAST_RUN, *CHEAP, "trainer.val_check_interval=500", "trainer.limit_val_batches=1"]


def test_a_short_run_saves_its_final_state_and_resumes_from_it_exactly(tmp_path):
    short, straight = tmp_path / "short", tmp_path / "straight"
    summary = train(short, [*NO_VALIDATION, "trainer.max_steps=30"])
    saved = load(last_ckpt(short))
    assert saved["global_step"] == 30 and summary["steps"] == 30
    assert summary["last_checkpoint"] == str(last_ckpt(short))
    assert json.loads((short / "summary.json").read_text())["last_checkpoint"] == str(last_ckpt(short))

    train(short, [*NO_VALIDATION, "trainer.max_steps=60", f"ckpt_path={last_ckpt(short)}"])
    train(straight, [*NO_VALIDATION, "trainer.max_steps=60"])
    resumed, expected = load(last_ckpt(short)), load(last_ckpt(straight))
    assert resumed["global_step"] == expected["global_step"] == 60
    assert_same_tensors(resumed["state_dict"], expected["state_dict"])
    torch.testing.assert_close(resumed["optimizer_states"], expected["optimizer_states"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["eblvm_generator_states"], expected["eblvm_generator_states"], rtol=0, atol=0)


# --- 5. resuming under a changed config --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "saved_value", "new_value"),
    [("objective.sigma=0.1", "objective.sigma", "0.05", "0.1"), ("optim.lr=0.01", "optim.lr", "0.001", "0.01")],
    ids=["objective.sigma", "optim.lr"],
)
def test_resuming_under_a_setting_that_changes_training_is_refused(tmp_path, override, key, saved_value, new_value):
    run_dir = tmp_path / "run"
    train(run_dir, SHORT)
    config_before = (run_dir / "config.yaml").read_text()
    resume = [*SHORT, "trainer.max_steps=6", f"ckpt_path={last_ckpt(run_dir)}", override]
    with pytest.raises(ConfigError) as refused:
        train(run_dir, resume)
    message = str(refused.value)
    assert refused.value.key == "ckpt_path" and str(last_ckpt(run_dir)) in message
    assert f"{key}: {saved_value} → {new_value}" in message, message
    assert "trainer.max_steps" not in message, "a key that may change is not among the blocking ones"
    # nothing of the run was replaced before the check
    assert (run_dir / "config.yaml").read_text() == config_before
    assert str(OmegaConf.select(OmegaConf.load(run_dir / "config.yaml"), key)) == saved_value
    assert load(last_ckpt(run_dir))["global_step"] == 4
    assert not (run_dir / RESUME_CHANGES_FILE).exists()


def test_resuming_with_settings_that_cannot_change_training_records_them(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, SHORT)
    changed = {
        "trainer.max_steps": (4, 6),
        "trainer.val_check_interval": (2, 3),
        "evaluation.ais_chains": (500, 7),
        "sampling.n_images": (64, 5),
    }
    overrides = [f"{key}={now}" for key, (_, now) in changed.items()]
    summary = train(run_dir, [*SHORT, *overrides, f"ckpt_path={last_ckpt(run_dir)}"])
    assert summary["steps"] == 6 and load(last_ckpt(run_dir))["global_step"] == 6
    history = yaml.safe_load((run_dir / RESUME_CHANGES_FILE).read_text())
    assert len(history) == 1 and history[0]["resumed_from"] == str(last_ckpt(run_dir))
    changes = history[0]["changes"]
    for key, (saved, now) in changed.items():
        assert changes.get(key) == {"saved": saved, "now": now}, key
    assert sorted(changes) == sorted(changed), f"resume_changes.yaml lists more than what changed: {sorted(changes)}"
    config = OmegaConf.load(run_dir / "config.yaml")
    assert config.trainer.max_steps == 6 and config.objective.sigma == 0.05


# --- 6. evaluation never moves training ---------------------------------------------------------------------------

# 60 steps of batches of 100 from 2000 rows (FAST_RUN's splits, trained on train + val: 25 steps an epoch): three
# epochs, so a shuffle that evaluation's randomness moved would show.
EVALUATION_CHANGES = {
    "validated every 10 steps": ["trainer.val_check_interval=10"],
    "never validated": ["trainer.val_check_interval=1000"],
    "other evaluation settings": [
        "trainer.val_check_interval=10",
        "sampling.n_samples=150",
        "evaluation.gradient_bias_repeats=3",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("objective", [CHEAP, ["objective=pcd"]], ids=["bism", "pcd"])
def test_evaluating_more_or_less_often_never_changes_the_trained_parameters(tmp_path, objective):
    base = [*FAST_RUN, *objective, "trainer.max_steps=60", "trainer.limit_val_batches=2"]
    final = {}
    for index, (name, changes) in enumerate(EVALUATION_CHANGES.items()):
        run_dir = tmp_path / f"run{index}"
        summary = train(run_dir, [*base, *changes])
        assert summary["steps"] == 60
        assert validations(run_dir) == (0 if name == "never validated" else 6), name
        final[name] = load(last_ckpt(run_dir))
    reference = final["validated every 10 steps"]
    persistent = "objective=pcd" in objective
    if persistent:
        assert reference["state_dict"]["objective.chain"].numel() > 0, "PCD's persistent chain is checkpointed"
    for name, checkpoint in final.items():
        assert checkpoint["global_step"] == 60, name
        assert_same_tensors(checkpoint["state_dict"], reference["state_dict"], name)
        torch.testing.assert_close(
            checkpoint["eblvm_generator_states"], reference["eblvm_generator_states"], rtol=0, atol=0
        )
        if persistent:
            assert torch.equal(checkpoint["state_dict"]["objective.chain"], reference["state_dict"]["objective.chain"])


# --- 7. checkpoints of format 0 -----------------------------------------------------------------------------------


def as_format_0(checkpoint: dict) -> dict:
    """What a checkpoint written before checkpoints carried their config held: no "eblvm" record, and numpy's
    global random state as numpy's own tuple (an array inside)."""
    old = copy.deepcopy(checkpoint)
    del old["eblvm"]
    old["eblvm_global_rng_states"]["numpy"] = np.random.get_state()  # noqa: NPY002 (the global state, as then)
    return old


def test_a_format_0_checkpoint_is_rebuilt_from_its_run_directory_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, SHORT)
    new = load(last_ckpt(run_dir))
    old_file = run_dir / "checkpoints" / "format0.ckpt"
    torch.save(as_format_0(new), old_file)
    assert "eblvm" not in torch.load(old_file, weights_only=False)

    trained = rebuild(old_file)
    assert trained.config.trainer.max_steps == 4 and trained.checkpoint["global_step"] == 4
    model_state = {f"model.{name}": value for name, value in trained.model.state_dict().items()}
    assert_same_tensors(model_state, {k: v for k, v in new["state_dict"].items() if k.startswith("model.")})

    summary = train(run_dir, [*SHORT, "trainer.max_steps=6", f"ckpt_path={old_file}"])
    assert summary["steps"] == 6
    resumed = load(last_ckpt(run_dir))
    assert resumed["global_step"] == 6 and resumed["eblvm"]["format_version"] >= 1

    (run_dir / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="holds no config") as refused:
        rebuild(old_file)
    assert str(old_file) in str(refused.value)


# --- 8. the W&B run id ----------------------------------------------------------------------------------------------


def test_a_run_resumed_in_its_directory_keeps_its_wandb_id_and_a_new_run_gets_its_own(tmp_path):
    first, other = tmp_path / "first", tmp_path / "other"
    wandb = [*SHORT, "logger=wandb"]
    train(first, wandb)
    first_id = (first / WANDB_ID_FILE).read_text().strip()
    assert len(first_id) == 8

    train(first, [*wandb, "trainer.max_steps=6", f"ckpt_path={last_ckpt(first)}"])
    assert (first / WANDB_ID_FILE).read_text().strip() == first_id
    assert load(last_ckpt(first))["global_step"] == 6

    # a new run, in a directory of its own, that starts from the first run's checkpoint
    summary = train(other, [*wandb, "trainer.max_steps=8", f"ckpt_path={last_ckpt(first)}"])
    assert summary["steps"] == 8
    other_id = (other / WANDB_ID_FILE).read_text().strip()
    assert len(other_id) == 8 and other_id != first_id
    assert (first / WANDB_ID_FILE).read_text().strip() == first_id


# --- 9. python -m eblvm.evaluate --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_reproduces_the_test_metrics_and_takes_other_evaluation_settings(finished_run, tmp_path):
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["log_z"] == "exact" and summary["tested"] == "final weights"

    result = python_module("eblvm.evaluate", str(finished_run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/log_likelihood" in result.stdout
    record = json.loads((finished_run / "evaluation" / "last" / "metrics.json").read_text())
    assert record["checkpoint"] == str(last_ckpt(finished_run)) and record["step"] == 4
    assert record["metrics"]["test/log_likelihood"] == pytest.approx(summary["test/log_likelihood"], abs=1e-6)
    assert f"{record['metrics']['test/log_likelihood']:.4f}" in result.stdout

    ais_settings = ["evaluation.ais_temperatures=50", "evaluation.ais_chains=20", "evaluation.exact_max_h_dim=1"]
    out = tmp_path / "ais"
    result = python_module("eblvm.evaluate", str(finished_run), "--out", str(out), "--set", *ais_settings)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "metrics.json").read_text())
    assert record["log_z"].startswith("AIS"), record["log_z"]
    assert record["evaluation"]["ais_chains"] == 20 and record["evaluation"]["exact_max_h_dim"] == 1
    assert record["metrics"]["test/log_likelihood_stderr"] > 0

    result = python_module("eblvm.evaluate", str(finished_run), "--out", str(tmp_path / "lr"), "--set", "optim.lr=1")
    assert result.returncode == 2, result.stdout + result.stderr[-3000:]
    assert "optim.lr" in result.stderr
    assert not (tmp_path / "lr" / "metrics.json").exists()


# --- 10. python -m eblvm.sample via q, more samples than training rows -----------------------------------------------

# 18 training rows of the 1797 digits (49% held out for validation, 50% for the test, validation not trained on).
FEW_ROWS = ["data.splits.val_fraction=0.49", "data.splits.test_fraction=0.5", "data.train_on_val=false"]


@pytest.mark.slow
def test_sampling_via_q_draws_more_samples_than_there_are_training_rows(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, [*FAST_DEEP, *FEW_ROWS])
    trained = rebuild(run_dir)
    n_rows = len(trained.datamodule.train_data)
    assert n_rows == 18
    n_samples = n_rows + 9  # not a multiple of the chunk (sampling.n_images=4) either
    out = tmp_path / "samples"
    result = python_module(
        "eblvm.sample", str(run_dir), "--mode", "via_q", "--n-samples", str(n_samples), "--out", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out / "samples.npz") as archive:
        samples = archive["samples"]
    assert samples.shape == (n_samples, 1, 8, 8) and samples.dtype == np.float32
    assert np.isfinite(samples).all()
    assert (out / "grid.png").is_file()


# --- the unroll --------------------------------------------------------------------------------------------------


class LinearToyPosterior(Posterior):
    """``forward(v) = v @ weight + bias``; ``spare`` takes no part in it, so the lower loss gives it no gradient."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(3, 2, generator=generator))
        self.bias = torch.nn.Parameter(torch.randn(2, generator=generator))
        self.spare = torch.nn.Parameter(torch.randn(4, generator=generator))

    def forward(self, v):
        return v @ self.weight + self.bias


def _toy_problem():
    generator = torch.Generator().manual_seed(1)
    v, target = torch.randn(8, 3, generator=generator), torch.randn(8, 2, generator=generator)

    def lower_loss(q) -> torch.Tensor:  # q: a BoundPosterior (the unroll) or the module (real steps)
        return ((q(v) - target) ** 2).mean()

    return lower_loss


def _warmed_up_adam(posterior, lower_loss, **options) -> torch.optim.Optimizer:
    """Adam after 3 real steps in which ``spare`` did get gradients: its moments are non-zero."""
    optimizer = torch.optim.Adam(posterior.parameters(), lr=0.05, betas=(0.9, 0.95), **options)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        (lower_loss(posterior) + (posterior.spare**2).sum()).backward()
        optimizer.step()
    return optimizer


def test_unroll_leaves_a_parameter_without_gradient_as_torch_adam_does(float64):
    lower_loss, n_steps = _toy_problem(), 4
    posterior = LinearToyPosterior()
    optimizer = _warmed_up_adam(posterior, lower_loss)
    assert optimizer.state[posterior.spare]["exp_avg"].abs().min() > 0
    before = {name: p.detach().clone() for name, p in posterior.named_parameters()}
    real_state_before = copy.deepcopy(optimizer.state_dict())

    unrolled = unroll(posterior, optimizer, lower_loss, n_steps).params

    # the same steps taken by torch's Adam on a copy: spare gets no gradient (None), so Adam skips it
    reference = copy.deepcopy(posterior)
    reference_optimizer = torch.optim.Adam(reference.parameters(), lr=0.05, betas=(0.9, 0.95))
    reference_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for _ in range(n_steps):
        reference_optimizer.zero_grad(set_to_none=True)
        lower_loss(reference).backward()
        assert reference.spare.grad is None
        reference_optimizer.step()

    for name in ("weight", "bias"):
        assert not torch.equal(unrolled[name], before[name]), f"{name} should move"
        torch.testing.assert_close(unrolled[name], getattr(reference, name), rtol=0, atol=1e-10)
    assert torch.equal(unrolled["spare"], before["spare"])
    assert torch.equal(reference.spare, before["spare"])
    # the real posterior and its optimizer are untouched, spare's moments included
    for name, p in posterior.named_parameters():
        assert torch.equal(p, before[name])
    torch.testing.assert_close(optimizer.state_dict(), real_state_before, rtol=0, atol=0)
    torch.testing.assert_close(
        reference_optimizer.state[reference.spare], optimizer.state[posterior.spare], rtol=0, atol=0
    )


def test_adam_step_keeps_the_state_of_a_parameter_without_gradient(float64):
    params = {"used": torch.ones(2), "spare": torch.full((2,), 3.0)}
    state = {
        name: {"step": 5.0, "exp_avg": torch.full((2,), 0.5), "exp_avg_sq": torch.full((2,), 0.25)} for name in params
    }
    group = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    new_params, new_state = adam_step(params, {"used": torch.ones(2), "spare": None}, state, group)
    assert torch.equal(new_params["spare"], params["spare"])
    assert new_state["spare"]["step"] == 5.0
    assert torch.equal(new_state["spare"]["exp_avg"], state["spare"]["exp_avg"])
    assert torch.equal(new_state["spare"]["exp_avg_sq"], state["spare"]["exp_avg_sq"])
    assert new_state["used"]["step"] == 6.0 and not torch.equal(new_params["used"], params["used"])


@pytest.mark.parametrize(
    ("optimizer_class", "options", "named"),
    [
        (torch.optim.Adam, {"amsgrad": True}, "amsgrad"),
        (torch.optim.Adam, {"maximize": True}, "maximize"),
        (torch.optim.SGD, {"maximize": True}, "maximize"),
    ],
    ids=["adam-amsgrad", "adam-maximize", "sgd-maximize"],
)
def test_unroll_refuses_optimizer_options_it_does_not_reproduce(optimizer_class, options, named):
    lower_loss = _toy_problem()
    posterior = LinearToyPosterior()
    optimizer = optimizer_class(posterior.parameters(), lr=0.05, **options)
    with pytest.raises(ValueError, match=named):
        unroll(posterior, optimizer, lower_loss, 2)
