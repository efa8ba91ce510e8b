"""End-to-end training: learning progress, run directory contents, DDP on two CPU processes."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from eblvm.assemble import instantiate_node
from eblvm.checkpoints import load_checkpoint
from eblvm.errors import DivergenceError
from eblvm.evaluation.likelihood import log_likelihood, log_partition
from eblvm.run import run
from tests.conftest import FAST_DEEP, FAST_RUN, compose_train_config


def test_default_config_is_the_documented_bidsm_run(tmp_path):
    cfg = compose_train_config(tmp_path, [])
    assert cfg.model.h_dim == 4 and cfg.posterior.temperature == 0.1 and cfg.posterior.net == "linear"
    assert cfg.objective.estimator == "bism" and cfg.objective.higher == "dsm" and cfg.objective.sigma == 0.05
    assert cfg.objective.lower == "elbo" and cfg.objective.n_lower_steps == 5 and cfg.objective.n_unroll == 5
    assert list(cfg.optim.betas) == [0.9, 0.95] and cfg.optim.lr == 1e-3
    assert cfg.data.splits._target_ == "eblvm.data.checkerboard"


@pytest.mark.slow
def test_short_checkerboard_run_raises_test_log_likelihood(tmp_path):
    cfg = compose_train_config(tmp_path, FAST_RUN + ["trainer.max_steps=600", "trainer.val_check_interval=300"])
    torch.manual_seed(cfg.seed)
    datamodule = instantiate_node("data", cfg.data)
    initial = instantiate_node("model", cfg.model, v_dim=datamodule.dim)
    initial_ll = float(log_likelihood(initial, datamodule.splits.test, log_partition(initial)))

    summary = run(cfg)

    assert summary["test/log_likelihood"] > initial_ll + 0.5, (initial_ll, summary["test/log_likelihood"])
    for name in ("config.yaml", "summary.json", "metrics.csv", "density.png", "samples.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["steps"] == 600 and saved["log_z"] == "exact"
    assert 0 <= saved["test/posterior_gap"] < 1 and saved["val/gradient_bias_relative"] >= 0
    assert saved["train/seconds_per_1000_steps"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [FAST_RUN, FAST_DEEP + ["trainer.max_steps=4"]], ids=["grbm", "deep"])
def test_ddp_on_two_cpu_processes(tmp_path, overrides):
    probe = tmp_path / "probe"
    cfg = compose_train_config(
        tmp_path,
        overrides
        + [
            "trainer=ddp_cpu",
            "+callbacks.probe._target_=tests.ddp_probe.RankProbe",
            f"+callbacks.probe.out_dir={probe}",
        ],
    )
    run(cfg)
    ranks = [torch.load(probe / f"rank{k}.pt") for k in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    torch.testing.assert_close(ranks[0]["parameters"], ranks[1]["parameters"], rtol=0, atol=0)
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == cfg.trainer.max_steps
    assert ranks[0]["seed"] != ranks[1]["seed"], "every rank must draw its own noise"
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"]), "ranks must see different data"
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert len(checkpoint["optimizer_states"]) == 2
    assert all(state["state"] for state in checkpoint["optimizer_states"]), "both optimizers have stepped"
    generator_states = checkpoint["eblvm_generator_states"]
    assert len(generator_states) == 2 and not torch.equal(*generator_states), "each rank's noise state is saved"
    with open(tmp_path / "metrics.csv", newline="") as file:
        header = next(csv.reader(file))
    assert {"val/objective", "test/objective"} <= set(header), "fit and test metrics share one metrics.csv"


def test_divergence_stops_with_the_step_and_keeps_the_last_finite_checkpoint(tmp_path):
    """The learning rate jumps x1e9 after 20 steps: the run must stop, naming the step and the quantity."""
    cfg = compose_train_config(
        tmp_path,
        FAST_RUN
        + [
            "optim=sgd",
            "optim.scheduler=step",
            "optim.step_size=20",
            "optim.gamma=1e9",
            "trainer.val_check_interval=10",
        ],
    )
    with pytest.raises(DivergenceError) as error:
        run(cfg)
    assert error.value.step >= 20 and ("loss" in error.value.quantity or "gradient" in error.value.quantity)
    assert f"at step {error.value.step}" in str(error.value)
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] <= error.value.step
    assert all(torch.isfinite(value).all() for value in checkpoint["state_dict"].values())
    assert not (tmp_path / "summary.json").exists()


def test_pcd_chains_are_saved_in_the_lightning_checkpoint(tmp_path):
    cfg = compose_train_config(tmp_path, FAST_RUN + ["objective=pcd"])
    run(cfg)
    chain = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]["objective.chain"]
    assert chain.shape == (cfg.data.batch_size, cfg.model.h_dim)
    assert set(chain.unique().tolist()) <= {0.0, 1.0}


def test_last_checkpoint_is_the_final_state_even_when_the_best_is_earlier(tmp_path):
    """Selecting by the lowest log-likelihood makes the best checkpoint an early one."""
    cfg = compose_train_config(
        tmp_path, FAST_RUN + ["trainer.val_check_interval=10", "callbacks.checkpoint.mode=min", "test_checkpoint=last"]
    )
    summary = run(cfg)
    steps = {name: load_checkpoint(tmp_path / "checkpoints" / f"{name}.ckpt")["global_step"]
             for name in ("best", "last")}  # fmt: skip
    assert steps["best"] < steps["last"] == cfg.trainer.max_steps
    assert summary["tested"] == "final weights"
