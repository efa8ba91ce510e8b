"""Every config option composes and instantiates; bad values stop before training with a clear message."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from scipy.io import savemat

from eblvm.assemble import build_dataclass, build_generator, check_pairing, instantiate_node
from eblvm.bilevel.optim import OptimConfig
from eblvm.errors import ConfigError, require_count
from eblvm.evaluation.settings import EvalConfig
from eblvm.objectives import ScoreMatching
from eblvm.run import run
from eblvm.sampling.draw import SamplingConfig
from tests.conftest import FAST_RUN, ROOT, compose_train_config
from tests.models import GaussianLinear

GROUPS = [
    "data",
    "model",
    "posterior",
    "objective",
    "generator",
    "optim",
    "trainer",
    "logger",
    "callbacks",
    "experiment",
]
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((ROOT / "conf" / group).glob("*.yaml"))]
# Read from local files in real formats: tests/test_image_data.py writes tiny ones and builds these configs.
# option -> the eblvm.data function it reads with
IMAGE_FILE_DATA = {name: name for name in ("mnist", "fashion_mnist", "cifar10", "svhn", "celeba", "image_folder")}
IMAGE_FILE_DATA["celeba64"] = IMAGE_FILE_DATA["celeba64_crop160"] = "celeba"
# Deep networks need image data and their partners: the latent EBM a Gaussian q fitted by the Fisher loss, the
# latent-free EBM an exact-score objective.
DEEP_PARTNERS = {
    ("model", "latent_ebm"): ["posterior=gaussian_conv", "objective.lower=fisher"],
    ("posterior", "gaussian_conv"): ["model=latent_ebm", "objective.lower=fisher"],
    ("model", "ebm"): ["objective=mdsm"],
}
# BiDVL's parts need each other: an energy over images, the Gaussian encoder, a generator and objective=bidvl.
BIDVL_PARTS = {"model": "sn_cnn_energy", "posterior": "gaussian_encoder", "generator": "dcgan", "objective": "bidvl"}


# The linear-Gaussian EBLVM has continuous latents: it pairs with a Gaussian posterior, not the default Bernoulli one.
CONTINUOUS_PARTNERS = {
    ("model", "gaussian_linear"): ["posterior=gaussian_mlp", "objective.lower=fisher"],
    ("posterior", "gaussian_linear_exact"): ["model=gaussian_linear"],
}


def overrides_for(group: str, option: str, tmp_path: Path) -> list[str]:
    """``group=option`` plus what it needs to build here: small file sizes, and image data for deep networks."""
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "freyface"):
        overrides += ["data.splits.n_train=20", "data.splits.n_val=10"]
    if (group, option) == ("data", "tensor_file"):
        overrides += [f"data.splits.path={tmp_path / 'points.npy'}"]
    if (group, option) in CONTINUOUS_PARTNERS:
        overrides += CONTINUOUS_PARTNERS[group, option]
    if (group, option) in DEEP_PARTNERS:
        overrides += ["data=digits", "callbacks.checkpoint.monitor=val/objective", *DEEP_PARTNERS[group, option]]
    if BIDVL_PARTS.get(group) is not None and (
        group == "generator" or option in (BIDVL_PARTS[group], "sn_resnet_energy")
    ):
        overrides += ["data=digits", "data.pixel_range=symmetric", "callbacks.checkpoint.monitor=val/objective"]
        overrides += [f"{other}={choice}" for other, choice in BIDVL_PARTS.items() if other != group]
    if group == "experiment":
        text = (ROOT / "conf" / "experiment" / f"{option}.yaml").read_text()
        if any(f"override /data: {name}\n" in text for name in IMAGE_FILE_DATA):
            overrides += ["data=digits"]  # the paper's image data are local files; digits takes the same code path
    return overrides


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_instantiates(tmp_path, group, option):
    cfg = compose_train_config(tmp_path, overrides_for(group, option, tmp_path))
    if group == "data" and option in IMAGE_FILE_DATA:
        assert cfg.data.splits._target_ == f"eblvm.data.{IMAGE_FILE_DATA[option]}"
        if option == "image_folder":
            assert OmegaConf.is_missing(cfg.data.splits, "path"), "the folder is the user's to name"
        else:
            assert cfg.data.splits.root.startswith(str(tmp_path)), "datasets are looked for under paths.data_dir"
        return
    rng = np.random.default_rng(0)
    savemat(tmp_path / "frey_rawface.mat", {"ff": rng.integers(0, 256, (560, 40), dtype=np.uint8)})
    np.save(tmp_path / "points.npy", rng.random((50, 3)).astype(np.float32))

    objective = instantiate_node("objective", cfg.objective)
    build_dataclass("optim", OptimConfig, cfg.optim)
    datamodule = instantiate_node("data", cfg.data)
    shapes = {"v_dim": datamodule.dim, "image_shape": datamodule.image_shape}
    model = instantiate_node("model", cfg.model, **shapes)
    posterior = (
        instantiate_node("posterior", cfg.posterior, **shapes, model=model) if objective.needs_posterior else None
    )
    generator = build_generator(cfg, objective, shapes)
    if posterior is not None and generator is None:
        assert posterior.h_dim == model.h_dim
    if not (group == "posterior" and option == "gaussian_mlp"):  # continuous q cannot pair with a GRBM
        check_pairing(model, posterior, objective, generator)
    settings = {"evaluation": EvalConfig(), "sampling": SamplingConfig(), "sampling_mode": "via_q"}
    for name, node in [*(cfg.logger or {}).items(), *cfg.callbacks.items()]:
        instantiate_node(name, node, **settings)
    if cfg.trainer.accelerator == "gpu":
        assert cfg.trainer.strategy.find_unused_parameters if "strategy" in cfg.trainer else True
    else:
        assert isinstance(instantiate_node("trainer", cfg.trainer), pl.Trainer)


BAD_VALUES = [
    ("objective.sigma=0", "objective.sigma=0", "noise levels must be > 0"),
    ("objective.sigma=-0.1", "objective.sigma=-0.1", "noise levels must be > 0"),
    ("objective.higher=mdsm objective.sigma0=0", "objective.sigma0=0", "noise levels must be > 0"),
    ("objective.n_unroll=-1", "objective.n_unroll=-1", "integer >= 0"),
    ("objective.n_lower_steps=-2", "objective.n_lower_steps=-2", "integer >= 0"),
    ("objective.higher=mdsm objective.sigma_begin=2.0", "objective.sigma_end=1.2", "must be > sigma_begin=2.0"),
    ("objective.higher=foo", "objective.higher='foo'", "must be one of sm, ssm, dsm, mdsm"),
    ("objective.lower=fisher", "objective.lower='fisher'", "continuous latents"),
    ("posterior.temperature=0", "posterior.temperature=0", "must be > 0"),
    ("posterior.log_prob=exact", "posterior.log_prob='exact'", "bernoulli, concrete"),
    ("posterior.h_dim=3", "posterior.h_dim=3", "must equal model.h_dim=4"),
    ("posterior=gaussian_mlp", "posterior='GaussianMLPPosterior'", "continuous latents but GRBM has binary"),
    ("model.h_dim=0", "model.h_dim=0", "an integer >= 1"),
    ("optim.lr=0", "optim.lr=0", "must be > 0"),
    ("optim.scheduler=linear", "optim.scheduler='linear'", "const, cosine, step"),
    ("trainer.max_steps=0", "trainer.max_steps=0", "must be an integer >= 1"),
    ("objective=vages objective.higher=ssm", "objective.higher='ssm'", "use dsm, mdsm or ksd"),
    ("objective=vages objective.n_particles=1", "objective.n_particles=1", "at least 2 particles"),
    ("objective=vages objective.n_unroll=5", "objective.n_unroll=5", "set objective.n_unroll=0"),
    ("objective=vages objective.covariance=full", "objective.covariance='full'", "unbiased, biased, none"),
    ("objective=vages objective.refine_steps=2", "objective.refine_steps=2", "latents are binary"),
    ("objective=ksd objective.bandwidth=0", "objective.bandwidth=0", "must be > 0 or 'median'"),
    ("objective=is_ksd objective.n_proposals=0", "objective.n_proposals=0", "an integer >= 1"),
    ("objective=cd objective.k=true", "objective.k=True", "an integer >= 1"),
]


@pytest.mark.parametrize(("override", "key_and_value", "allowed"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_stop_before_training_with_key_value_and_rule(tmp_path, override, key_and_value, allowed):
    cfg = compose_train_config(tmp_path, FAST_RUN + override.split())
    with pytest.raises(ConfigError) as error:
        run(cfg)
    message = str(error.value)
    assert message.startswith(key_and_value) and allowed in message, message
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.yaml").exists()


def test_exact_score_needs_a_free_energy():
    with pytest.raises(ConfigError, match=r"objective.estimator='exact'.*tractable free energy.*objective=bism"):
        ScoreMatching(estimator="exact").check_model(GaussianLinear(2, 2), latent_type=None)


def test_unknown_options_and_keys_are_refused(tmp_path):
    with pytest.raises(MissingConfigException, match="objective/foo"):
        compose_train_config(tmp_path, ["objective=foo"])
    with pytest.raises(ConfigCompositionException, match="n_unrol"):
        compose_train_config(tmp_path, ["objective.n_unrol=3"])


def test_missing_data_file_names_the_path_and_the_fix(tmp_path):
    cfg = compose_train_config(tmp_path, ["data=freyface"])
    with pytest.raises(FileNotFoundError) as error:
        run(cfg)
    assert str(tmp_path / "frey_rawface.mat") in str(error.value)
    assert "data.splits.path=" in str(error.value)


DIGITS = ["data=digits", "trainer.max_steps=1", "callbacks.progress.refresh_rate=0", "logger=csv"]
DEEP_DIGITS = DIGITS + ["model=latent_ebm", "model.h_dim=4", "model.channels=4",
                        "callbacks.checkpoint.monitor=val/objective", "callbacks.checkpoint.mode=min"]  # fmt: skip
CONV_POSTERIOR = ["posterior=gaussian_conv", "posterior.channels=[4,4,4]"]
CPU_CORES = os.cpu_count()
IMPOSSIBLE_COMBINATIONS = [
    ("exact score, no free energy", DEEP_DIGITS + CONV_POSTERIOR + ["objective=dsm"], "objective.estimator='exact'",
     "tractable free energy"),
    ("binary q for continuous latents", DEEP_DIGITS + ["posterior=bernoulli", "posterior.h_dim=4"], "posterior=",
     "binary latents but LatentEBM has continuous"),
    ("deep energy on 2-D points", FAST_RUN + ["model=latent_ebm"], "data.image_shape=None",
     "deep energies need image data"),
    ("image size the ResNet cannot take", DEEP_DIGITS + CONV_POSTERIOR + ["data.image_shape=[1,4,16]"],
     "data.image_shape=[1, 4, 16]",
     "multiples of 8"),
    ("conv posterior on a GRBM", DIGITS + CONV_POSTERIOR, "posterior='GaussianConvPosterior'",
     "has continuous latents but GRBM has binary ones"),
    ("more CPU processes than cores", FAST_RUN + ["trainer=ddp_cpu", f"trainer.devices={CPU_CORES + 1}"],
     f"trainer.devices={CPU_CORES + 1}", f"this machine has {CPU_CORES} CPU cores"),
    ("misspelt key of a component", FAST_RUN + ["+objective.n_unrol=3"], "objective.n_unrol=3",
     "ScoreMatching takes no such key"),
    ("IS-KSD on continuous latents", FAST_RUN + ["model=gaussian_linear", "objective=is_ksd", "data=moons"],
     "objective.estimator='importance'", "uniform binary proposals need binary latents"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "key_and_value", "allowed"),
    [case[1:] for case in IMPOSSIBLE_COMBINATIONS],
    ids=[case[0] for case in IMPOSSIBLE_COMBINATIONS],
)
def test_combinations_that_cannot_work_stop_before_training(tmp_path, overrides, key_and_value, allowed):
    with pytest.raises(ConfigError) as error:
        run(compose_train_config(tmp_path, overrides))
    message = str(error.value)
    assert message.startswith(key_and_value) and allowed in message, message
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.yaml").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without GPUs")
def test_gpu_trainer_without_a_gpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="trainer.accelerator='gpu': no GPU is visible on this machine"):
        run(compose_train_config(tmp_path, FAST_RUN + ["trainer=gpu"]))


def test_misspelt_keys_in_an_experiment_file_stop_composition(tmp_path):
    """The train.yaml schema (eblvm/config.py) covers keys that experiment files set, not only command-line ones."""
    (tmp_path / "experiment").mkdir()
    for name, body in (("top", "evaluaton:\n  ais_chains: 10\n"), ("nested", "evaluation:\n  ais_chain: 10\n")):
        (tmp_path / "experiment" / f"{name}.yaml").write_text("# @package _global_\n" + body)
    search_path = f"hydra.searchpath=[file://{tmp_path}]"
    with pytest.raises(ConfigCompositionException, match="evaluaton"):
        compose_train_config(tmp_path, [search_path, "experiment=top"])
    with pytest.raises(ConfigCompositionException, match="ais_chain"):
        compose_train_config(tmp_path, [search_path, "experiment=nested"])
    with pytest.raises(ConfigCompositionException, match="ema_decay"):
        compose_train_config(tmp_path, ["ema_decay=fast"])  # typed: a float or null


# What each debug option sets (conf/debug), composed over the default config, or over the experiment it is for.
DEBUG_OPTIONS = {
    "fast": ([], {"trainer.max_steps": 30, "trainer.val_check_interval": 15, "trainer.limit_val_batches": 2,
                  "callbacks.progress.refresh_rate": 0, "data.splits.n_train": 2000, "data.splits.n_val": 500,
                  "data.splits.n_test": 500, "sampling.n_samples": 200, "sampling.gibbs_sweeps": 20}),
    "fast_deep": (["experiment=digits_bimdsm"], {
        "model.channels": 4, "model.h_dim": 3, "posterior.channels": [4, 4, 4], "objective.n_lower_steps": 2,
        "data.batch_size": 20, "trainer.max_steps": 1, "trainer.val_check_interval": 1, "trainer.limit_val_batches": 1,
        "callbacks.progress.refresh_rate": 0, "sampling.n_images": 4, "sampling.langevin.hot_steps": 2,
        "sampling.langevin.anneal_steps": 2, "sampling.langevin.cool_steps": 2}),
    "fast_bidvl": (["experiment=digits_bidvl"], {
        "model.channels": 4, "posterior.h_dim": 3, "posterior.channels": 4, "generator.channels": 4,
        "data.batch_size": 20, "trainer.max_steps": 2, "trainer.val_check_interval": 2, "trainer.limit_val_batches": 1,
        "callbacks.progress.refresh_rate": 0, "sampling.n_images": 4, "evaluation.ood_samples": 20}),
    "overfit": ([], {"trainer.overfit_batches": 1, "trainer.max_steps": 300, "trainer.val_check_interval": 25,
                     "data.splits.n_train": 2000, "callbacks.progress.refresh_rate": 0}),
    "profile": ([], {"trainer.profiler": "simple", "trainer.max_steps": 30, "data.splits.n_train": 2000}),
}  # fmt: skip


def test_every_debug_option_is_checked():
    assert sorted(DEBUG_OPTIONS) == sorted(path.stem for path in (ROOT / "conf" / "debug").glob("*.yaml"))


@pytest.mark.parametrize("option", sorted(DEBUG_OPTIONS))
def test_debug_option_sets_its_values_and_the_trainer_takes_them(tmp_path, option):
    before, expected = DEBUG_OPTIONS[option]
    cfg = compose_train_config(tmp_path, [*before, f"debug={option}"])
    assert {key: OmegaConf.select(cfg, key) for key in expected} == expected
    assert list(cfg.logger) == ["csv"], "debug runs log to <run>/metrics.csv only"
    trainer = instantiate_node("trainer", cfg.trainer)
    assert trainer.max_steps == expected["trainer.max_steps"]
    if option == "overfit":
        assert trainer.overfit_batches == 1
    if option == "profile":
        assert type(trainer.profiler).__name__ == "SimpleProfiler"


def test_options_after_a_debug_option_win(tmp_path):
    cfg = compose_train_config(tmp_path, ["debug=fast", "trainer.max_steps=600", "logger=wandb"])
    assert cfg.trainer.max_steps == 600 and "wandb" in cfg.logger and cfg.trainer.val_check_interval == 15


# The objective each checkerboard experiment selects and the keys it sets; the rest comes from
# conf/experiment/base/checkerboard.yaml. NCE and VNCE use the paper's noise, N(0, I).
CHECKERBOARD_OBJECTIVES = {
    "checkerboard_bidsm": ("bism", {"higher": "dsm", "sigma": 0.05, "lower": "elbo", "n_lower_steps": 5,
                                    "n_unroll": 5}),
    "checkerboard_bissm": ("bism", {"higher": "ssm", "sigma": 0.05, "lower": "elbo", "n_lower_steps": 5,
                                    "n_unroll": 5}),
    "checkerboard_cd": ("cd", {"k": 5}),
    "checkerboard_dsm": ("dsm", {"sigma": 0.05}),
    "checkerboard_nce": ("nce", {"noise": "standard_normal"}),
    "checkerboard_pcd": ("pcd", {"k": 1}),
    "checkerboard_ssm": ("ssm", {}),
    "checkerboard_vnce": ("vnce", {"noise": "standard_normal"}),
    "checkerboard_vagesdsm": ("vages", {"estimator": "vages", "higher": "dsm", "sigma": 0.05, "lower": "elbo",
                                        "n_lower_steps": 5, "n_unroll": 0, "n_particles": 2,
                                        "covariance": "unbiased", "share_particles": False}),
    "checkerboard_vagesksd": ("vages", {"higher": "ksd", "bandwidth": 0.1, "lower": "elbo", "n_lower_steps": 5,
                                        "n_unroll": 0, "n_particles": 2}),
    "checkerboard_ksd": ("ksd", {"estimator": "exact", "higher": "ksd", "bandwidth": 0.1}),
    "checkerboard_is_ksd": ("is_ksd", {"estimator": "importance", "higher": "ksd", "bandwidth": 0.1,
                                       "n_proposals": 5}),
}  # fmt: skip


def test_every_checkerboard_experiment_is_checked():
    files = sorted(path.stem for path in (ROOT / "conf" / "experiment").glob("checkerboard_*.yaml"))
    assert files == sorted(CHECKERBOARD_OBJECTIVES)


@pytest.mark.parametrize("experiment", sorted(CHECKERBOARD_OBJECTIVES))
def test_checkerboard_experiment_composes_with_its_objective_over_the_shared_base(tmp_path, experiment):
    objective, keys = CHECKERBOARD_OBJECTIVES[experiment]
    cfg = compose_train_config(tmp_path, [f"experiment={experiment}"])
    choices = HydraConfig.get().runtime.choices
    assert (choices.objective, choices.data, choices.model, choices.posterior, choices.optim) == (
        objective, "checkerboard", "grbm", "bernoulli", "adam")  # fmt: skip
    assert cfg.objective._target_ == OmegaConf.load(ROOT / "conf" / "objective" / f"{objective}.yaml")._target_
    assert {key: cfg.objective[key] for key in keys} == keys
    assert (cfg.seed, cfg.model.h_dim, cfg.trainer.max_steps, cfg.trainer.val_check_interval) == (1234, 4, 100000, 5000)


def test_counts_must_be_integers_not_bools_or_floats():
    require_count("k", 0, 0)
    require_count("k", 3, 1)
    for value in (True, 1.0, 0, "2"):
        with pytest.raises(ConfigError, match=f"^k={value!r}: must be an integer >= 1"):
            require_count("k", value, 1)
