"""Ensembles (docs/methods.md §9): member k of an ensemble is the run with its seed alone, for every objective."""

from __future__ import annotations

import functools
import json

import pytest
import pytorch_lightning as pl
import torch

from eblvm import noise
from eblvm.assemble import assemble, rebuild
from eblvm.checkpoints import load_checkpoint
from eblvm.ensemble import EnsembleConfig, assemble_ensemble, export_member, member_config, run_ensemble
from eblvm.errors import ConfigError
from eblvm.members import member_slice
from eblvm.noise import MemberGenerators
from eblvm.run import WANDB_ID_FILE
from eblvm.sample import sample
from tests.conftest import FAST_RUN, compose_train_config

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8
# Every objective that trains a GRBM, and the linear-Gaussian model with a learned and with its exact posterior.
OBJECTIVES = {
    "bidsm": ["objective=bism"],
    "bissm": ["objective=bism", "objective.higher=ssm"],
    "bimdsm": ["objective=bism", "objective.higher=mdsm"],
    "bism_iwae_particles": ["objective=bism", "objective.lower=iwae", "objective.n_particles=2"],
    "bidsm_clipped": ["objective=bism", "optim.clip_grad_norm=0.5"],
    "bidsm_sgd_momentum": ["objective=bism", "optim=sgd", "optim.momentum=0.9", "optim.lr=0.01"],
    "bidsm_exact_posterior": ["objective=bism", "posterior=grbm_exact"],
    "sm": ["objective=sm"],
    "dsm": ["objective=dsm"],
    "ssm": ["objective=ssm"],
    "mdsm": ["objective=mdsm"],
    "cd": ["objective=cd"],
    "pcd": ["objective=pcd"],
    "nce": ["objective=nce"],
    "vnce": ["objective=vnce"],
    "vages_dsm": ["objective=vages"],
    "vages_mdsm_biased": ["objective=vages", "objective.higher=mdsm", "objective.covariance=biased"],
    "vages_ksd": ["objective=vages", "objective.higher=ksd", "objective.bandwidth=median"],
    "ksd": ["objective=ksd"],
    "is_ksd": ["objective=is_ksd"],
    "gaussian_linear_bism_fisher": [
        "model=gaussian_linear", "posterior=gaussian_mlp", "posterior.hidden_dim=16", "objective=bism",
        "objective.lower=fisher", "data=moons",
    ],
    "gaussian_linear_exact_posterior": [
        "model=gaussian_linear", "posterior=gaussian_linear_exact", "objective=bism", "data=moons",
    ],
    "gaussian_linear_dsm": ["model=gaussian_linear", "objective=dsm", "data=moons"],
    "gaussian_linear_vages_fisher": [
        "model=gaussian_linear", "posterior=gaussian_mlp", "posterior.hidden_dim=16", "objective=vages",
        "objective.lower=fisher", "data=moons",
    ],
}  # fmt: skip


def _quiet_trainer(steps: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, inference_mode=False, num_sanity_val_steps=0,
    )  # fmt: skip


def _trained_alone(cfg) -> dict[str, torch.Tensor]:
    parts = assemble(cfg)
    module = parts.module(cfg)
    _quiet_trainer(STEPS).fit(module, parts.datamodule)
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _trained_together(cfg):
    parts = assemble_ensemble(cfg)
    _quiet_trainer(STEPS).fit(parts.module, parts.datamodule)
    return parts


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_each_member_ends_where_its_seed_alone_does(tmp_path, objective):
    """Three members trained together end with the parameters (and chains) of the three runs trained alone: the
    same initialisation, batches and noise from each seed, and no operation mixing members."""
    overrides = FAST_RUN + OBJECTIVES[objective] + ["data.batch_size=20"]
    cfg = compose_train_config(tmp_path / "ensemble", overrides + ["ensemble.size=3", "seed=7"])
    parts = _trained_together(cfg)
    ensemble = EnsembleConfig.of(cfg)
    assert ensemble.member_seeds(cfg.seed) == [7, 8, 9]
    for member in range(3):
        alone = _trained_alone(compose_train_config(tmp_path / f"alone{member}", overrides + [f"seed={7 + member}"]))
        together = parts.member_state(member)
        assert together.keys() == alone.keys()
        for name, value in alone.items():
            torch.testing.assert_close(together[name], value, rtol=1e-5, atol=1e-6, msg=f"{objective} {name}")
    # the members did not all end alike: they are different runs
    first, second = parts.member_state(0), parts.member_state(1)
    assert not torch.equal(first["model.b"], second["model.b"])


def test_members_vary_learning_rate_and_noise_level_as_their_own_runs(tmp_path):
    """``ensemble.vary``: member k trains as the run with the k-th learning rates and DSM noise level, under a cosine
    schedule with a floor (the member rates are exact for affine schedules)."""
    lrs, posterior_lrs, sigmas = [1e-3, 3e-3], [2e-3, 5e-4], [0.05, 0.2]
    common = FAST_RUN + ["data.batch_size=20", "optim.scheduler=cosine", "optim.min_lr=1e-4", "seed=3"]
    varied = [f"+ensemble.vary.optim.lr=[{lrs[0]},{lrs[1]}]", f"+ensemble.vary.optim.posterior_lr=[{posterior_lrs[0]},"
              f"{posterior_lrs[1]}]", f"+ensemble.vary.objective.sigma=[{sigmas[0]},{sigmas[1]}]"]  # fmt: skip
    parts = _trained_together(compose_train_config(tmp_path / "ensemble", common + ["ensemble.size=2", *varied]))
    for member in range(2):
        settings = [f"optim.lr={lrs[member]}", f"optim.posterior_lr={posterior_lrs[member]}",
                    f"objective.sigma={sigmas[member]}", f"seed={3 + member}"]  # fmt: skip
        alone = _trained_alone(compose_train_config(tmp_path / f"alone{member}", common + settings))
        for name, value in alone.items():
            torch.testing.assert_close(parts.member_state(member)[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_member_generators_draw_what_each_seed_draws():
    draws = {
        noise.gaussian: lambda generator: torch.randn((4, 3, 2), generator=generator),
        noise.uniform: lambda generator: torch.rand((4, 3, 2), generator=generator),
        noise.signs: lambda generator: 2.0 * torch.randint(0, 2, (4, 3, 2), generator=generator) - 1,
    }
    for draw, draw_alone in draws.items():
        stacked = draw((4, 2, 3, 2), MemberGenerators([5, 6]), torch.zeros(()))
        assert stacked.is_contiguous()
        for member, seed in enumerate([5, 6]):
            assert torch.equal(stacked[:, member], draw_alone(torch.Generator().manual_seed(seed))), draw.__name__
    with pytest.raises(ValueError, match="row tensors"):
        noise.uniform((3, 2), MemberGenerators([5, 6]), torch.zeros(()))


def test_a_diverging_member_is_masked_and_the_others_go_on(tmp_path):
    """A member whose loss turns non-finite keeps its last finite parameters, energy and q (frozen, the event
    recorded), while the other members train as they would have."""
    overrides = FAST_RUN + ["data.batch_size=20", "objective=bism"]
    cfg = compose_train_config(tmp_path / "ensemble", overrides + ["ensemble.size=2", "seed=11"])
    parts = assemble_ensemble(cfg)
    with torch.no_grad():
        parts.module.model.log_sigma[1] = -60.0  # member 1's variance underflows: its loss is infinite at once
    frozen = {name: value.clone() for name, value in parts.member_state(1).items()}
    _quiet_trainer(STEPS).fit(parts.module, parts.datamodule)
    assert [event["member"] for event in parts.module.masked_events] == [1]
    assert parts.module.masked_events[0]["step"] == 0
    assert parts.module.active.tolist() == [True, False]
    for name, value in parts.member_state(1).items():
        assert torch.equal(value, frozen[name]), name
    alone = _trained_alone(compose_train_config(tmp_path / "alone", overrides + ["seed=11"]))
    for name, value in alone.items():
        torch.testing.assert_close(parts.member_state(0)[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_an_ensemble_run_writes_members_as_ordinary_runs(tmp_path):
    """``run_ensemble``: per-member metrics rows, summaries and checkpoints that load as single runs; a member
    exported from the ensemble's last checkpoint equals the member's own last checkpoint."""
    out = tmp_path / "run"
    overrides = ["ensemble.size=2", "evaluation.gradient_bias_repeats=2", "trainer.log_every_n_steps=10"]
    overrides.append("logger=wandb")  # metrics.csv and a W&B run per member, grouped under the ensemble
    cfg = compose_train_config(out, FAST_RUN + overrides)
    summary = run_ensemble(cfg)
    assert summary["members"] == 2 and summary["seeds"] == [cfg.seed, cfg.seed + 1]
    assert set(summary["mean"]) >= {"test/log_likelihood", "test/objective"}
    rows = (out / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "member" in header and "val/log_likelihood" in header and "train/loss" in header
    members = {row.split(",")[header.index("member")] for row in rows[1:]}
    assert members == {"0", "1"}
    member_lls = []
    for member in range(2):
        member_dir = out / "members" / str(member)
        member_summary = json.loads((member_dir / "summary.json").read_text())
        assert member_summary["seed"] == cfg.seed + member
        member_lls.append(member_summary["test/log_likelihood"])
        last = load_checkpoint(member_dir / "checkpoints" / "last.ckpt")
        assert last["eblvm"]["config"]["seed"] == cfg.seed + member
        exported = load_checkpoint(export_member(out, member, tmp_path / f"exported{member}.ckpt"))
        for name, value in last["state_dict"].items():
            assert torch.equal(exported["state_dict"][name], value), name
    assert member_lls[0] != member_lls[1]
    assert summary["mean"]["test/log_likelihood"] == pytest.approx(sum(member_lls) / 2, rel=1e-12)
    assert summary["std"]["test/log_likelihood"] == pytest.approx(abs(member_lls[0] - member_lls[1]) / 2**0.5)
    with pytest.raises(ConfigError, match="is an ensemble's"):
        rebuild(out)


def test_ensemble_settings_are_checked_before_any_work(tmp_path):
    cases = {
        "ensemble.vary.optim.betas": ["ensemble.size=2", "+ensemble.vary.optim.betas=[0.9,0.8]"],
        "ensemble.vary.optim.lr": ["ensemble.size=2", "+ensemble.vary.optim.lr=[0.1]"],
        "ensemble.seeds": ["ensemble.size=2", "ensemble.seeds=[1,1]"],
        "on_nonfinite": ["ensemble.size=2", "on_nonfinite=skip"],
        "ensemble.size": ["ensemble.size=1", "ensemble.seeds=[4]"],
        "model": ["ensemble.size=2", "experiment=digits_bimdsm"],
        "ensemble.vary.objective.sigma": [
            "ensemble.size=2", "objective.higher=mdsm", "+ensemble.vary.objective.sigma=[1,2]"
        ],
    }  # fmt: skip
    for key, overrides in cases.items():
        cfg = compose_train_config(tmp_path / key, FAST_RUN + overrides)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            assemble_ensemble(cfg)


def test_member_configs_are_single_runs(tmp_path):
    cfg = compose_train_config(tmp_path, FAST_RUN + ["ensemble.size=2", "+ensemble.vary.optim.lr=[0.1,0.2]"])
    config = member_config(cfg, EnsembleConfig.of(cfg), 1)
    assert config.seed == cfg.seed + 1 and config.optim.lr == 0.2 and config.ensemble.size == 1
    assert config.paths.output_dir == str(tmp_path / "members" / "1")


def test_member_slice_keeps_shared_and_unborn_state():
    state = {
        "model.W": torch.arange(6.0).view(3, 2),
        "objective.noise_mean": torch.ones(2),
        "objective.chain": torch.empty(0),
    }
    sliced = member_slice(state, 2, {"model.W": torch.Size([2]), "objective.chain": None})
    assert torch.equal(sliced["model.W"], torch.tensor([4.0, 5.0]))
    assert sliced["objective.noise_mean"] is state["objective.noise_mean"] and sliced["objective.chain"].numel() == 0


def test_a_resumed_ensemble_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    """15 steps, then resumed from ``last.ckpt`` to 30, ends where 30 steps in one go do: the members' generators,
    shuffling positions, optimizer states and masks are all in the checkpoint. Each member's W&B run goes on under
    its own id."""
    overrides = FAST_RUN + ["ensemble.size=2", "objective=pcd", "evaluation.gradient_bias_repeats=0", "logger=wandb"]
    wandb_runs = []  # (save_dir, id) of every W&B logger built
    build_wandb_logger = pl.loggers.WandbLogger.__init__

    @functools.wraps(build_wandb_logger)  # the same signature, so the builder passes it the same arguments
    def recorded(self, *args, **kwargs):
        wandb_runs.append((kwargs["save_dir"], kwargs["id"]))
        build_wandb_logger(self, *args, **kwargs)

    monkeypatch.setattr(pl.loggers.WandbLogger, "__init__", recorded)
    straight = tmp_path / "straight"
    run_ensemble(compose_train_config(straight, overrides + ["trainer.max_steps=30"]))
    halves = tmp_path / "halves"
    run_ensemble(compose_train_config(halves, overrides + ["trainer.max_steps=15"]))
    member_ids = [(halves / "members" / str(member) / WANDB_ID_FILE).read_text() for member in range(2)]
    resumed = overrides + ["trainer.max_steps=30", f"ckpt_path={halves / 'checkpoints' / 'last.ckpt'}"]
    run_ensemble(compose_train_config(halves, resumed))
    assert [(halves / "members" / str(member) / WANDB_ID_FILE).read_text() for member in range(2)] == member_ids
    member_dirs = [str(halves / "members" / str(member)) for member in range(2)]
    assert wandb_runs[-4:] == list(zip(member_dirs * 2, member_ids * 2, strict=True)), "both halves, the same runs"
    straight_ids = [(straight / "members" / str(member) / WANDB_ID_FILE).read_text() for member in range(2)]
    assert len({*member_ids, *straight_ids}) == 4, "each member of each ensemble is a W&B run of its own"
    for name in ("straight", "halves"):
        assert load_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt")["global_step"] == 30
    first = load_checkpoint(straight / "checkpoints" / "last.ckpt")["state_dict"]
    second = load_checkpoint(halves / "checkpoints" / "last.ckpt")["state_dict"]
    assert first.keys() == second.keys()
    for name, value in first.items():
        assert torch.equal(second[name], value), name


def test_a_member_checkpoint_samples_and_evaluates_as_a_single_run(tmp_path):
    """A member's own checkpoint is an ordinary one: ``eblvm.sample`` draws images from a digits GRBM member."""
    overrides = [
        "data=digits", "model.h_dim=16", "objective=cd", "trainer.max_steps=10", "trainer.val_check_interval=5",
        "trainer.limit_val_batches=1", "logger=csv", "callbacks.progress.refresh_rate=0", "sampling.gibbs_sweeps=5",
        "sampling.n_samples=16", "sampling.n_images=8", "ensemble.size=2",
    ]  # fmt: skip
    out = tmp_path / "run"
    run_ensemble(compose_train_config(out, overrides))
    samples = sample(out / "members" / "1", n_samples=8, out=tmp_path / "samples")
    assert (samples / "grid.png").stat().st_size > 0
