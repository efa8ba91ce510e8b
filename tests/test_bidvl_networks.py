"""BiDVL's networks (docs/methods.md §5): rows with leading axes, output ranges, the paper's layer sizes, the
initialisations, spectral normalisation and its checkpointed power-iteration state, refused image shapes."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize

from eblvm.errors import ConfigError
from eblvm.models import DCGANGenerator, ResNetGenerator, SNConvEnergy, SNResNetEnergy
from eblvm.posteriors import GaussianEncoderPosterior
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

H = 5  # latent size of the small networks
SHAPES = [(1, 8, 8), (3, 8, 8), (1, 32, 32), (3, 32, 32), (1, 64, 64), (3, 64, 64)]
# Small versions of every network, by the config option that builds it.
NETS = {
    "sn_cnn_energy": lambda shape: SNConvEnergy(shape, channels=4),
    "sn_resnet_energy": lambda shape: SNResNetEnergy(shape, channels=4),
    "dcgan": lambda shape: DCGANGenerator(H, shape, channels=4),
    "sngan_resnet": lambda shape: ResNetGenerator(H, shape, channels=4),
    "encoder_dcgan": lambda shape: GaussianEncoderPosterior(shape, H, "dcgan", 4, bounded_log_variance=True),
    "encoder_resnet": lambda shape: GaussianEncoderPosterior(shape, H, "resnet", 4),
}
ENERGIES = ["sn_cnn_energy", "sn_resnet_energy"]
GENERATORS = ["dcgan", "sngan_resnet"]


def net_input(name: str, shape: tuple[int, int, int], lead: tuple[int, ...]) -> torch.Tensor:
    """Latents for a generator, image rows in [−1, 1] for the others."""
    if name in GENERATORS:
        return torch.randn(*lead, H)
    return torch.rand(*lead, math.prod(shape)) * 2 - 1


def outputs(result) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def raw_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a layer was initialised with: the unnormalised original of a spectrally normalised layer."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


def layers_of(net: nn.Module, kinds=(nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in net.named_modules() if isinstance(m, kinds)]


def conv_sizes(net: nn.Module) -> list[tuple[int, ...]]:
    """``(in, out, kernel, stride, padding)`` of every (transposed) conv, in order."""
    convs = layers_of(net, (nn.Conv2d, nn.ConvTranspose2d))
    return [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0]) for _, m in convs]


# --- shapes and ranges -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(NETS))
def test_leading_axes_are_folded_into_the_batch(name, shape):
    torch.manual_seed(0)
    net = NETS[name](shape)
    by_hand = copy.deepcopy(net)  # the same weights, batch-norm statistics and power-iteration vectors
    x = net_input(name, shape, (2, 3))
    d = math.prod(shape)
    tail = {"dcgan": (d,), "sngan_resnet": (d,), "encoder_dcgan": (H,), "encoder_resnet": (H,)}.get(name, ())
    results, folded = outputs(net(x)), outputs(by_hand(x.reshape(6, -1)))
    assert len(results) == len(folded) == (2 if name.startswith("encoder") else 1)
    for result, reference in zip(results, folded, strict=True):
        assert result.shape == (2, 3, *tail)
        torch.testing.assert_close(result, reference.reshape(result.shape))


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)], ids=["8px", "32px"])
def test_energies_are_latent_free_and_the_cnn_energy_is_nonnegative(shape):
    torch.manual_seed(0)
    v = torch.randn(16, math.prod(shape)) * 5
    for name in ENERGIES:
        model = NETS[name](shape)
        assert model.h_dim == 0 and model.has_free_energy and model.latent_type == "continuous"
        assert model.image_shape == shape and model.v_dim == math.prod(shape)
        assert model.free_energy(v).shape == (16,)
        model.eval()  # a train-mode call runs a power iteration, which changes the next call's normalisation
        torch.testing.assert_close(model(v, None), model.free_energy(v))
        assert model.score(v).shape == v.shape
    assert (SNConvEnergy(shape, channels=4).free_energy(v) >= 0).all()


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)], ids=["8px", "32px"])
@pytest.mark.parametrize("name", GENERATORS)
def test_generators_end_in_tanh(name, shape):
    torch.manual_seed(0)
    generator = NETS[name](shape)
    assert generator.h_dim == H and generator.image_shape == shape
    assert (generator(torch.randn(64, H)).abs() <= 1).all()
    last = generator.layers[-2] if name == "dcgan" else generator.conv
    with torch.no_grad():
        last.weight *= 1e3  # saturate: the bound must come from the output layer
    images = generator(torch.randn(64, H))
    assert (images.abs() <= 1).all() and images.abs().max() > 0.999


@pytest.mark.parametrize("trunk", ["dcgan", "resnet"])
def test_encoder_is_a_gaussian_posterior_with_an_optionally_bounded_variance(trunk):
    torch.manual_seed(0)
    shape, v = (3, 32, 32), torch.rand(8, 3 * 32 * 32) * 2 - 1
    bounded = GaussianEncoderPosterior(shape, H, trunk, 4, bounded_log_variance=True)
    raw = bounded.log_variance_head(bounded.trunk(v.reshape(-1, *shape))).reshape(8, H)
    mean, log_std = bounded(v)
    torch.testing.assert_close(log_std, -0.5 * torch.nn.functional.softplus(raw))
    assert (2 * log_std <= 0).all(), "log σ² = −softplus(·) ≤ 0"
    unbounded = copy.deepcopy(bounded)
    unbounded.bounded_log_variance = False
    torch.testing.assert_close(unbounded(v)[1], 0.5 * raw)

    dist = (mean, log_std)
    assert bounded.latent_type == "continuous" and bounded.mean(dist).shape == (8, H)
    sample = bounded.rsample(dist, 7, torch.Generator().manual_seed(0))
    assert sample.shape == (7, 8, H)
    log_q = bounded.log_prob(sample, dist)
    assert log_q.shape == (7, 8)
    torch.testing.assert_close(bounded.distribution(dist).log_prob(sample), log_q)


# --- the paper's sizes -------------------------------------------------------------------------------------------


def test_cnn_energy_has_the_papers_layers():
    paper = SNConvEnergy((3, 32, 32))
    assert conv_sizes(paper) == [
        (3, 64, 3, 1, 1), (64, 64, 4, 2, 1), (64, 128, 3, 1, 1), (128, 128, 4, 2, 1), (128, 256, 3, 1, 1),
        (256, 256, 4, 2, 1), (256, 512, 3, 1, 1), (512, 512, 4, 1, 0), (512, 512, 1, 1, 0), (512, 1, 1, 1, 0),
    ]  # fmt: skip
    slopes = [m.negative_slope for m in paper.layers if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.1] * 9 and isinstance(paper.layers[-1], nn.Conv2d)
    assert conv_sizes(SNConvEnergy((1, 8, 8))) == [
        (1, 64, 3, 1, 1), (64, 64, 4, 2, 1), (64, 128, 3, 1, 1), (128, 128, 4, 1, 0), (128, 128, 1, 1, 0),
        (128, 1, 1, 1, 0),
    ]  # fmt: skip
    small_32, small_64 = conv_sizes(SNConvEnergy((3, 32, 32), channels=4)), conv_sizes(SNConvEnergy((3, 64, 64), 4))
    assert small_64[:6] == small_32[:6] and len(small_64) == len(small_32) + 2
    assert small_64[6:8] == [(16, 32, 3, 1, 1), (32, 32, 4, 2, 1)]


def test_dcgan_generator_and_encoder_have_the_papers_layers():
    generator = DCGANGenerator(100, (3, 32, 32))
    assert conv_sizes(generator) == [
        (100, 384, 4, 1, 0), (384, 384, 4, 2, 1), (384, 192, 4, 2, 1), (192, 96, 4, 2, 1), (96, 3, 3, 1, 1),
    ]  # fmt: skip
    convs = [m for _, m in layers_of(generator)]
    assert [m.bias is not None for m in convs] == [False] * 4 + [True]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in generator.modules()) == 4
    assert isinstance(generator.layers[-1], nn.Tanh)
    assert conv_sizes(DCGANGenerator(100, (3, 64, 64)))[:2] == [(100, 768, 4, 1, 0), (768, 768, 4, 2, 1)]

    encoder = GaussianEncoderPosterior((3, 32, 32))
    assert conv_sizes(encoder.trunk) == [(3, 48, 3, 1, 1), (48, 96, 4, 2, 1), (96, 192, 4, 2, 1), (192, 384, 4, 2, 1)]
    assert all(m.bias is None for _, m in layers_of(encoder.trunk))
    for head in (encoder.mean_head, encoder.log_variance_head):
        assert conv_sizes(head) == [(384, 100, 4, 1, 0)] and head.bias is not None
    slopes = {m.negative_slope for m in encoder.trunk if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.2} and sum(isinstance(m, nn.BatchNorm2d) for m in encoder.trunk) == 4


def test_residual_networks_have_the_sngan_layout():
    energy = SNResNetEnergy((3, 32, 32))
    shortcuts = [block.shortcut is not None for block in energy.blocks]
    assert len(energy.blocks) == 5 and shortcuts == [True, True, True, False, False]
    assert energy.linear.in_features == 128 and energy.linear.out_features == 1
    small = SNResNetEnergy((3, 32, 32), channels=4)
    assert small.blocks(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 4, 4)
    assert [small.blocks[: k + 1](torch.zeros(1, 3, 32, 32)).shape[-1] for k in range(3)] == [16, 8, 4]

    generator = ResNetGenerator(128, (3, 32, 32))
    assert generator.linear.in_features == 128 and generator.linear.out_features == 4 * 4 * 256
    assert len(generator.blocks) == 3 and generator.conv.in_channels == 256 and generator.conv.out_channels == 3
    assert len(ResNetGenerator(128, (3, 64, 64), channels=4).blocks) == 4
    encoder = GaussianEncoderPosterior((3, 32, 32), trunk="resnet", channels=4)
    assert encoder.trunk(torch.zeros(2, 3, 32, 32)).shape == (2, 32, 4, 4)


# --- initialisation ----------------------------------------------------------------------------------------------


def assert_biases_and_batch_norms_start_at_zero_and_one(net: nn.Module) -> None:
    for _, layer in layers_of(net, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d)):
        if layer.bias is not None:
            assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        if isinstance(layer, nn.BatchNorm2d):
            assert torch.equal(layer.weight, torch.ones_like(layer.weight))


DCGAN_NETS = {
    "sn_cnn_energy": lambda: SNConvEnergy((3, 32, 32)),
    "dcgan": lambda: DCGANGenerator(100, (3, 32, 32)),
    "encoder_dcgan": lambda: GaussianEncoderPosterior((3, 32, 32)),
    "encoder_resnet": lambda: GaussianEncoderPosterior((3, 32, 32), trunk="resnet", channels=16),
}


@pytest.mark.parametrize("name", list(DCGAN_NETS))
def test_dcgan_initialisation(name):
    torch.manual_seed(0)
    net = DCGAN_NETS[name]()
    convs = layers_of(net, (nn.Conv2d, nn.ConvTranspose2d))
    assert convs
    for layer_name, layer in convs:
        weight = raw_weight(layer).detach()
        n = weight.numel()  # five standard errors of a Gaussian sample's mean and standard deviation
        assert abs(weight.mean()) < 5 * 0.02 / math.sqrt(n), layer_name
        assert abs(weight.std() / 0.02 - 1) < 5 / math.sqrt(2 * n), layer_name
    assert_biases_and_batch_norms_start_at_zero_and_one(net)


@pytest.mark.parametrize("name", ["sn_resnet_energy", "sngan_resnet"])
def test_residual_networks_start_xavier_uniform(name):
    torch.manual_seed(0)
    net = SNResNetEnergy((3, 32, 32), channels=32) if name == "sn_resnet_energy" else ResNetGenerator(16, (3, 32, 32))
    for layer_name, layer in layers_of(net):
        weight = raw_weight(layer).detach()
        in_block_3x3 = layer_name.startswith("blocks.") and weight.dim() == 4 and weight.shape[-1] == 3
        fan_in, fan_out = weight[0].numel(), weight.shape[0] * weight[0, 0].numel()
        bound = (math.sqrt(2) if in_block_3x3 else 1.0) * math.sqrt(6 / (fan_in + fan_out))
        assert weight.abs().max() <= bound, layer_name
        # a uniform sample's standard deviation has a relative standard error of sqrt(0.2 / n)
        assert abs(weight.std() * math.sqrt(3) / bound - 1) < 5 * math.sqrt(0.2 / weight.numel()), layer_name
    assert_biases_and_batch_norms_start_at_zero_and_one(net)


# --- spectral normalisation --------------------------------------------------------------------------------------

POWER_PASSES = 100


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (3, 64, 64)], ids=["8px", "32px", "64px"])
@pytest.mark.parametrize("name", ENERGIES)
def test_spectral_norm_keeps_every_layers_largest_singular_value_at_one(name, shape):
    """After ``POWER_PASSES`` train-mode passes (one power iteration each, on top of the 15 at construction) every
    layer's largest singular value is within 1e-3 of 1.

    The error falls as (σ₂/σ₁)^(2k) after k iterations, and σ₂/σ₁ of a random initial layer can be close to 1.
    Measured with ``channels=4``: with seed 0 the worst layer is at most 1.7e-4 off after 100 passes (4e-3 after 50,
    5e-6 after 200, float32 round-off, 3e-7, later); over seeds 0–9, 58 of the 60 networks are within 4.2e-4 after
    100 passes, and two whose slowest layer has σ₂/σ₁ ≈ 0.997 are 3.5e-3 and 6.2e-3 off.
    """
    torch.manual_seed(0)
    model = NETS[name](shape)
    normalised = [m for _, m in layers_of(model) if parametrize.is_parametrized(m, "weight")]
    assert len(normalised) == len(layers_of(model)), "every conv and linear layer is spectrally normalised"
    v = torch.rand(1, math.prod(shape))
    with torch.no_grad():
        for _ in range(POWER_PASSES):
            model(v)
    model.eval()  # reading the weight in eval mode runs no further power iteration
    with torch.no_grad():
        for layer in normalised:
            weight = layer.weight  # what torch normalises: (out, in·k·k) for a conv
            sigma = torch.linalg.matrix_norm(weight.reshape(weight.shape[0], -1), ord=2)
            assert abs(sigma.item() - 1) < 1e-3


@pytest.mark.parametrize("name", list(NETS))
def test_a_checkpoint_restores_the_network_exactly(name):
    torch.manual_seed(0)
    shape = (3, 8, 8)
    net = NETS[name](shape)
    x = net_input(name, shape, (4,))
    with torch.no_grad():
        for _ in range(5):  # move the power-iteration vectors and batch-norm statistics off their start
            net(net_input(name, shape, (4,)))
    state = net.state_dict()
    n_normalised = sum(parametrize.is_parametrized(m, "weight") for m in net.modules())
    assert sum(key.endswith(("weight.0._u", "weight.0._v")) for key in state) == 2 * n_normalised
    assert (n_normalised > 0) == (name in ENERGIES)

    torch.manual_seed(1)
    fresh = NETS[name](shape)
    fresh.load_state_dict(state)
    with torch.no_grad():
        for _ in range(2):  # train mode: the power iterations and batch statistics go on identically
            for ours, theirs in zip(outputs(net(x)), outputs(fresh(x)), strict=True):
                assert torch.equal(ours, theirs)
        net.eval()
        fresh.eval()
        for ours, theirs in zip(outputs(net(x)), outputs(fresh(x)), strict=True):
            assert torch.equal(ours, theirs)
    if name in ENERGIES:  # without its vectors a copy's first power iteration gives another normalisation
        stale = NETS[name](shape)
        stale.load_state_dict({k: t for k, t in state.items() if not k.endswith(("_u", "_v"))}, strict=False)
        with torch.no_grad():
            assert not torch.equal(stale.train()(x), net.train()(x))


# --- refused arguments -------------------------------------------------------------------------------------------

BUILDERS = {
    "model=sn_cnn_energy": lambda shape: SNConvEnergy(shape, channels=4),
    "model=sn_resnet_energy": lambda shape: SNResNetEnergy(shape, channels=4),
    "generator=dcgan": lambda shape: DCGANGenerator(H, shape, channels=4),
    "generator=sngan_resnet": lambda shape: ResNetGenerator(H, shape, channels=4),
    "posterior=gaussian_encoder": lambda shape: GaussianEncoderPosterior(shape, H, channels=4),
}
BAD_SHAPES = [None, [64], [3, 12, 12], [3, 32, 16], [3, 4, 4], [0, 8, 8], [3, 48, 48]]


@pytest.mark.parametrize("bad", BAD_SHAPES, ids=str)
@pytest.mark.parametrize("option", list(BUILDERS))
def test_bad_image_shapes_are_refused_naming_data_image_shape(option, bad):
    with pytest.raises(ConfigError) as error:
        BUILDERS[option](bad)
    assert error.value.key == "data.image_shape" and option in error.value.allowed
    if bad is None or len(bad) != 3:
        rule = "needs image data: set data.image_shape to [channels, height, width]"
    elif bad[0] < 1:
        rule = "needs a channel or more"
    else:
        rule = "needs square images whose side is a power of 2 and at least 8"
    assert rule in error.value.allowed


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: SNConvEnergy((1, 8, 8), channels=0), "channels"),
        (lambda: SNConvEnergy((1, 8, 8), negative_slope=1.0), "negative_slope"),
        (lambda: SNResNetEnergy((1, 8, 8), channels=True), "channels"),
        (lambda: DCGANGenerator(0, (1, 8, 8)), "h_dim"),
        (lambda: ResNetGenerator(2, (1, 8, 8), channels=0), "channels"),
        (lambda: GaussianEncoderPosterior((1, 8, 8), trunk="vgg"), "trunk"),
        (lambda: GaussianEncoderPosterior((1, 8, 8), h_dim=0), "h_dim"),
    ],
    ids=["cnn-channels", "slope", "resnet-channels", "dcgan-h_dim", "sngan-channels", "trunk", "encoder-h_dim"],
)
def test_bad_arguments_name_their_key(build, key):
    with pytest.raises(ConfigError) as error:
        build()
    assert error.value.key == key


# --- configs -----------------------------------------------------------------------------------------------------

CONFIGS = {
    "model/sn_cnn_energy": SNConvEnergy,
    "model/sn_resnet_energy": SNResNetEnergy,
    "generator/dcgan": DCGANGenerator,
    "generator/sngan_resnet": ResNetGenerator,
    "posterior/gaussian_encoder": GaussianEncoderPosterior,
}


@pytest.mark.parametrize("option", list(CONFIGS))
def test_config_options_build_their_network_with_the_constructors_defaults(option):
    group, name = option.split("/")
    cls = CONFIGS[option]
    cfg = OmegaConf.create({"posterior": OmegaConf.load(ROOT / "conf/posterior/gaussian_encoder.yaml")})
    cfg[group] = OmegaConf.load(ROOT / "conf" / group / f"{name}.yaml")
    node = cfg[group]
    assert node._target_ == f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}"
    parameters = inspect.signature(cls).parameters
    for key, value in node.items():
        if key == "_target_":
            continue
        assert key in parameters, key
        if key != "h_dim" or group == "posterior":
            assert value == parameters[key].default, key
    net = instantiate(node, image_shape=[1, 8, 8], channels=4)
    assert isinstance(net, cls) and net.image_shape == (1, 8, 8)
    if group == "generator":
        assert net.h_dim == cfg.posterior.h_dim == 100
