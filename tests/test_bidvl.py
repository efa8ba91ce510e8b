"""BiDVL (docs/methods.md §5): each term's gradient flow, the closed forms, the order of one iteration written out
by hand, OOD AUROC, and the run through train.py (few steps, exact resume, DDP on two CPU processes)."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

from eblvm.assemble import assemble
from eblvm.callbacks import ImageQuality
from eblvm.callbacks.base import network_mode
from eblvm.checkpoints import load_checkpoint
from eblvm.data import digits
from eblvm.errors import ConfigError, DivergenceError
from eblvm.evaluation.ood import auroc, constant_images, pixel_shuffled
from eblvm.evaluation.settings import EvalConfig
from eblvm.models import DCGANGenerator, SNConvEnergy
from eblvm.objectives import BiDVL
from eblvm.objectives.bidvl import gaussian_kl_to_prior, reconstruction_errors
from eblvm.objectives.estimators import frozen_energy
from eblvm.posteriors import GaussianEncoderPosterior
from eblvm.run import run
from eblvm.sample import sample
from tests.conftest import FAST_BIDVL, checkpoint_every, compose_train_config, saved_at
from tests.test_resume import assert_resumes_exactly

IMAGE = (1, 8, 8)
D = math.prod(IMAGE)
H_DIM = 3


def tiny_networks(seed: int = 0):
    torch.manual_seed(seed)
    energy = SNConvEnergy(IMAGE, channels=4)
    encoder = GaussianEncoderPosterior(IMAGE, h_dim=H_DIM, channels=4)
    generator = DCGANGenerator(H_DIM, IMAGE, channels=4)
    return energy, encoder, generator


def moved(loss: torch.Tensor, modules: dict[str, torch.nn.Module]) -> dict[str, bool]:
    """Which modules a loss's backward gives a non-zero gradient."""
    for module in modules.values():
        module.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {
        name: any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters())
        for name, module in modules.items()
    }


def test_each_term_moves_only_the_networks_methods_says():
    energy, encoder, generator = tiny_networks()
    modules = {"energy": energy, "encoder": encoder, "generator": generator}
    objective = BiDVL()
    noise = torch.Generator().manual_seed(1)
    v = torch.rand(6, D, generator=noise) * 2 - 1
    latent = torch.randn(6, H_DIM, generator=noise)
    generated = generator(latent)

    upper = objective.upper_loss(energy.free_energy, v, generated)
    assert moved(upper, modules) == {"energy": True, "encoder": False, "generator": False}

    frozen = frozen_energy(energy)
    terms = objective.lower_terms(lambda x: frozen(x, None), encoder, generator, v, latent, generated, noise)
    expected = {
        "generated_energy": {"energy": False, "encoder": False, "generator": True},
        "cycle": {"energy": False, "encoder": False, "generator": True},  # the encoder is held fixed
        "reconstruction": {"energy": False, "encoder": True, "generator": True},
        "kl": {"energy": False, "encoder": True, "generator": False},
        "loss": {"energy": False, "encoder": True, "generator": True},
    }
    for name, flow in expected.items():
        assert moved(terms[name], modules) == flow, name


def test_hinge_upper_loss_is_the_mean_of_both_margins():
    energy, encoder, generator = tiny_networks()
    noise = torch.Generator().manual_seed(2)
    v = torch.rand(5, D, generator=noise) * 2 - 1
    latent = torch.randn(5, H_DIM, generator=noise)
    generated = generator(latent)
    hinge = BiDVL(upper="hinge").upper_loss(energy.free_energy, v, generated)
    data_energy, generated_energy = energy.free_energy(v), energy.free_energy(generated)
    expected = torch.relu(1 + data_energy).mean() + torch.relu(1 - generated_energy).mean()
    torch.testing.assert_close(hinge, expected)


def test_kl_to_the_prior_equals_the_closed_form_of_torch_distributions():
    generator = torch.Generator().manual_seed(3)
    mean, log_std = torch.randn(7, 4, generator=generator), torch.randn(7, 4, generator=generator)
    q = torch.distributions.Normal(mean, log_std.exp())
    prior = torch.distributions.Normal(torch.zeros(4), torch.ones(4))
    expected = torch.distributions.kl_divergence(q, prior).sum(-1)
    torch.testing.assert_close(gaussian_kl_to_prior(mean, log_std), expected)


def test_reconstruction_errors_equal_a_direct_computation():
    images = torch.tensor([[0.0, 1.0, -1.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    reconstructions = torch.tensor([[0.5, 1.0, 0.0, 0.5], [0.0, 1.0, 1.0, -1.0]])
    # squared errors per image: 0.25 + 0 + 1 + 0 = 1.25 and 1 + 0 + 0 + 4 = 5
    errors = reconstruction_errors(images, reconstructions)
    assert float(errors["per_image_sum"]) == pytest.approx((1.25 + 5) / 2)
    assert float(errors["per_pixel_mean"]) == pytest.approx((1.25 + 5) / 8)


def test_auroc_is_one_for_separable_scores_and_one_half_for_identical_sets():
    assert auroc(torch.tensor([2.0, 3.0, 4.0]), torch.tensor([-1.0, 0.0, 1.9])) == 1.0
    assert auroc(torch.tensor([-1.0, 0.0]), torch.tensor([2.0, 3.0])) == 0.0
    same = torch.randn(50, generator=torch.Generator().manual_seed(4))
    assert auroc(same, same.clone()) == 0.5


def test_out_of_distribution_sets_keep_what_they_should():
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(4, 3 * 4 * 4, generator=generator)
    shuffled = pixel_shuffled(images, (3, 4, 4), generator)
    by_pixel = images.reshape(4, 3, 16).transpose(1, 2)  # (image, pixel, channel): a pixel's channels move together
    shuffled_by_pixel = shuffled.reshape(4, 3, 16).transpose(1, 2)
    for original, permuted in zip(by_pixel, shuffled_by_pixel, strict=True):
        assert sorted(map(tuple, original.tolist())) == sorted(map(tuple, permuted.tolist()))
    assert not torch.equal(shuffled, images)
    constant = constant_images(3, (3, 4, 4), generator).reshape(3, 3, 16)
    assert torch.equal(constant, constant[:, :, :1].expand_as(constant))


@pytest.mark.parametrize(
    ("fresh_latent", "upper", "generator_lr"),
    [(False, "diff", None), (True, "diff", None), (True, "hinge", 2e-3)],
    ids=["same-latent", "fresh-latent", "hinge-three-optimizers"],
)
def test_one_iteration_equals_the_two_updates_written_out_by_hand(tmp_path, fresh_latent, upper, generator_lr):
    probe = tmp_path / "probe"
    overrides = FAST_BIDVL + [
        "trainer.max_steps=1",
        f"objective.fresh_latent={str(fresh_latent).lower()}",
        f"objective.upper={upper}",
        f"optim.generator_lr={'null' if generator_lr is None else generator_lr}",
        "optim.posterior_weight_decay=0.01",
        "optim.posterior_betas=[0.5,0.8]",
        "+callbacks.probe._target_=tests.ddp_probe.RankProbe",
        f"+callbacks.probe.out_dir={probe}",
    ]
    cfg = compose_train_config(tmp_path, overrides)
    run(cfg)
    record = torch.load(probe / "rank0.pt")
    v, initial = record["first_batch"], record["initial_state"]

    energy = SNConvEnergy(IMAGE, channels=4)
    encoder = GaussianEncoderPosterior(IMAGE, h_dim=H_DIM, channels=4)
    generator = DCGANGenerator(H_DIM, IMAGE, channels=4)
    for prefix, module in (("model.", energy), ("posterior.", encoder), ("generator_net.", generator)):
        module.load_state_dict({k.removeprefix(prefix): x for k, x in initial.items() if k.startswith(prefix)})
        module.train()
    energy_adam = torch.optim.Adam(energy.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    lower = {"betas": (0.5, 0.8), "weight_decay": 0.01}
    if generator_lr is None:
        params = [*encoder.parameters(), *generator.parameters()]
        lower_adams = [torch.optim.Adam(params, lr=cfg.optim.posterior_lr, **lower)]
    else:
        lower_adams = [
            torch.optim.Adam(encoder.parameters(), lr=cfg.optim.posterior_lr, **lower),
            torch.optim.Adam(generator.parameters(), lr=generator_lr, **lower),
        ]
    noise = torch.Generator().manual_seed(cfg.seed)  # rank 0's training noise

    latent = torch.randn(len(v), H_DIM, generator=noise)
    generated = generator(latent)
    data_energy, generated_energy = energy(v), energy(generated.detach())
    if upper == "hinge":
        upper_loss = torch.relu(1 + data_energy).mean() + torch.relu(1 - generated_energy).mean()
    else:
        upper_loss = data_energy.mean() - generated_energy.mean()
    upper_loss.backward()
    energy_adam.step()

    if fresh_latent:
        latent = torch.randn(len(v), H_DIM, generator=noise)
        generated = generator(latent)
    energy.requires_grad_(False)
    generated_energy = energy(generated).mean()
    encoder.requires_grad_(False)
    cycle = ((encoder(generated)[0] - latent) ** 2).sum(-1).mean()
    encoder.requires_grad_(True)
    mean, log_std = encoder(v)
    h = mean + log_std.exp() * torch.randn(1, len(v), H_DIM, generator=noise)[0]
    reconstruction = ((generator(h) - v) ** 2).sum(-1).mean()
    kl = (-0.5 * (1 + 2 * log_std - mean**2 - (2 * log_std).exp()).sum(-1)).mean()
    lower_loss = generated_energy + cycle / H_DIM + cfg.objective.lambda_vae * (reconstruction + kl)
    for adam in lower_adams:
        adam.zero_grad()
    lower_loss.backward()
    for adam in lower_adams:
        adam.step()

    final = record["final_state"]
    for prefix, module in (("model.", energy), ("posterior.", encoder), ("generator_net.", generator)):
        for name, value in module.state_dict().items():
            torch.testing.assert_close(final[prefix + name], value, msg=f"{prefix}{name}")


def test_digits_bidvl_runs_evaluates_and_samples_from_its_generator(tmp_path):
    epoch = ["optim.scheduler=epoch", "optim.gamma=0.5"]
    summary = run(compose_train_config(tmp_path, FAST_BIDVL + ["optim.generator_lr=1.0e-3", "ema_decay=0.9", *epoch]))
    assert summary["sampling_mode"] == "generator" and summary["network_mode"] == "eval"
    for key in ("reconstruction_mse_per_pixel", "reconstruction_sse_per_image"):
        assert math.isfinite(summary[f"test/{key}"])
    assert summary["test/reconstruction_sse_per_image"] == pytest.approx(
        D * summary["test/reconstruction_mse_per_pixel"]
    )
    assert {f"test/auroc_{name}" for name in ("uniform", "constant", "shuffled")} <= summary.keys()
    assert (tmp_path / "reconstructions").is_dir() and (tmp_path / "samples").is_dir()
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert len(checkpoint["optimizer_states"]) == 3, "energy, encoder and generator each have an optimizer"
    # scheduler=epoch: 1257 training digits at debug=fast_bidvl's batch of 20 are 62 steps an epoch
    assert [schedule["step_size"] for schedule in checkpoint["lr_schedulers"]] == [1257 // 20] * 3
    assert any(".parametrizations.weight.0._u" in name for name in checkpoint["state_dict"])
    out = sample(tmp_path, n_samples=5, out=tmp_path / "drawn")
    assert (out / "grid.png").is_file()


class RecordingFeatures(torch.nn.Module):
    """Stands in for the Inception network: keeps the images it is given, returns random features."""

    seen: list[torch.Tensor] = []

    def __init__(self, weights):
        super().__init__()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        RecordingFeatures.seen.append(images.detach().clone())
        return torch.randn(len(images), 4, generator=torch.Generator().manual_seed(len(self.seen)))


def test_fid_compares_generator_samples_with_training_images_in_unit_pixels(tmp_path):
    """The FID path sees [0, 1] images: the training images mapped back from [-1, 1], and generator samples."""
    weights = tmp_path / "inception.pth"
    weights.touch()
    RecordingFeatures.seen = []
    cfg = compose_train_config(
        tmp_path, FAST_BIDVL + ["evaluation.fid_samples=8", f"evaluation.inception_weights={weights}"]
    )
    with mock.patch("eblvm.callbacks.images.InceptionFeatures", RecordingFeatures):
        summary = run(cfg)
    assert "test/fid" in summary and summary["sampling_mode"] == "generator"
    train = digits().train  # [0, 1], as the FID callback orders it
    expected = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))][:8]
    seen = RecordingFeatures.seen
    torch.testing.assert_close(seen[0].reshape(8, -1), expected, rtol=0, atol=1e-6)
    assert len(seen) == 3 and all(float(images.min()) >= 0 and float(images.max()) <= 1 for images in seen)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (FAST_BIDVL + ["~generator"], "BiDVL trains a generator: choose one with generator=dcgan"),
        (["debug=fast", "generator=dcgan"], "only objectives that train a generator use one"),
        (FAST_BIDVL + ["generator.h_dim=5"], "generator.h_dim=5: must equal posterior.h_dim=3"),
        (FAST_BIDVL + ["data.pixel_range=unit"], "data.pixel_range='unit': BiDVL's generator ends in tanh"),
        (["debug=fast", "evaluation.ood_sets=[uniform]"], "evaluation.ood_sets=.*GRBM lacks"),
        (["debug=fast", "data.pixel_range=symmetric"], "data.pixel_range='symmetric': rescales images"),
        (FAST_BIDVL + ["evaluation.ood_sets=[nearby]"], "evaluation.ood_sets='nearby': each set must be one of"),
    ],
    ids=["no-generator", "generator-without-bidvl", "latent-sizes", "unit-pixels", "ood-without-free-energy",
         "rescaled-vectors", "unknown-ood-set"],
)  # fmt: skip
def test_bidvl_settings_that_cannot_work_are_refused_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run(compose_train_config(tmp_path, overrides))


def test_network_mode_train_uses_batch_statistics_and_puts_the_buffers_back():
    _, encoder, generator = tiny_networks()
    encoder.eval()
    before = {name: value.clone() for name, value in encoder.state_dict().items()}
    rows = torch.rand(6, D, generator=torch.Generator().manual_seed(6))
    with network_mode(encoder, "train"):
        assert encoder.training
        encoder(rows)
        assert not torch.equal(encoder.state_dict()["trunk.1.running_mean"], before["trunk.1.running_mean"])
    assert not encoder.training
    torch.testing.assert_close(encoder.state_dict(), before, rtol=0, atol=0)


def test_fid_in_generator_mode_may_use_every_training_image(tmp_path):
    """via_q conditions its samples on training images apart from the real set; a generator on none."""
    weights = tmp_path / "inception.pth"
    weights.touch()
    cfg = compose_train_config(tmp_path, FAST_BIDVL)
    parts = assemble(cfg)
    n_train = len(parts.datamodule.train_data)
    evaluation = EvalConfig(fid_samples=n_train, inception_weights=str(weights))
    quality = ImageQuality(evaluation, parts.sampling, parts.sampling_mode)
    assert parts.sampling_mode == "generator"
    assert quality.applies(parts.model, parts.posterior, parts.objective, parts.datamodule)
    via_q = ImageQuality(evaluation, parts.sampling, "via_q")
    with pytest.raises(ConfigError, match=f"at most {n_train // 2}"):
        via_q.applies(parts.model, parts.posterior, parts.objective, parts.datamodule)


NAN_LOWER = ["objective._target_=tests.nan_objective.BidvlNaNAtSteps"]


def test_a_non_finite_lower_step_stops_the_run_naming_it(tmp_path):
    with pytest.raises(DivergenceError, match="lower loss is nan"):
        run(compose_train_config(tmp_path, FAST_BIDVL + NAN_LOWER + ["+objective.nan_steps=[1]"]))


def test_skip_drops_only_the_non_finite_lower_steps(tmp_path):
    """Every lower step is NaN: the energy trains, the encoder and generator keep their initial weights."""
    probe = tmp_path / "probe"
    overrides = (
        FAST_BIDVL
        + NAN_LOWER
        + [
            "+objective.nan_steps=[0,1,2,3]",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "on_nonfinite=skip",
            "+callbacks.probe._target_=tests.ddp_probe.RankProbe",
            f"+callbacks.probe.out_dir={probe}",
        ]
    )
    summary = run(compose_train_config(tmp_path, overrides))
    assert summary["steps"] == 3
    record = torch.load(probe / "rank0.pt")
    initial, final = record["initial_state"], record["final_state"]
    for name in initial:  # weights and batch-norm statistics
        if name.startswith(("posterior.", "generator_net.")):
            assert torch.equal(initial[name], final[name]), name
    assert not torch.equal(initial["model.layers.0.parametrizations.weight.original"],
                           final["model.layers.0.parametrizations.weight.original"])  # fmt: skip
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["eblvm_skipped_steps"] == (3, 3)


def test_bidvl_resumes_exactly(tmp_path):
    overrides = FAST_BIDVL + ["trainer.max_steps=8", "trainer.val_check_interval=4", "test_checkpoint=last"]
    assert_resumes_exactly(tmp_path, overrides, stop_step=6, steps=8)


def test_ddp_ranks_agree_on_weights_and_buffers_and_resume_exactly(tmp_path):
    """Two CPU processes: different noise and batches, the same weights, batch-norm statistics and spectral-norm
    vectors on both ranks; resumed from its step-4 checkpoint, a run ends where the 8 steps in one go end."""
    probe = tmp_path / "probe"
    common = FAST_BIDVL + ["trainer=ddp_cpu", "trainer.val_check_interval=4", "test_checkpoint=last"]
    probed = ["+callbacks.probe._target_=tests.ddp_probe.RankProbe", f"+callbacks.probe.out_dir={probe}"]
    run(
        compose_train_config(
            tmp_path / "whole", common + probed + checkpoint_every(4, tmp_path) + ["trainer.max_steps=8"]
        )
    )
    ranks = [torch.load(probe / f"rank{k}.pt") for k in (0, 1)]
    assert ranks[0]["seed"] != ranks[1]["seed"]
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])
    torch.testing.assert_close(ranks[0]["final_state"], ranks[1]["final_state"], rtol=0, atol=0)
    assert any("running_var" in name for name in ranks[0]["final_state"])
    assert any("weight.0._u" in name for name in ranks[0]["final_state"])
    for name, value in ranks[0]["final_state"].items():
        if "running_mean" in name:
            assert not torch.equal(value, ranks[0]["initial_state"][name]), f"{name} was never updated"

    resumed = [f"ckpt_path={saved_at(4, tmp_path)}", "trainer.max_steps=8"]
    run(compose_train_config(tmp_path / "split", common + resumed))
    whole = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.ckpt")
    assert whole["global_step"] == split["global_step"] == 8
    torch.testing.assert_close(whole["state_dict"], split["state_dict"], rtol=0, atol=0)
    torch.testing.assert_close(whole["optimizer_states"], split["optimizer_states"], rtol=0, atol=0)
