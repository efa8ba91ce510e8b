"""Image metrics against their formulas: FID and KID with a stand-in feature extractor (global average pooling,
so constant images carry their features exactly), the local-file Inception path, the linear probe, image figures."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg
from torch import nn
from torch_fidelity import feature_extractor_inceptionv3

from eblvm.evaluation.images import image_quality, linear_probe
from eblvm.evaluation.plots import plot_samples, save_image_grid

# Features of image i are its channel means: images that are constant per channel carry any features in [0, 1].
POOL = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
MEAN = np.full(3, 0.5)
SCALE = np.array([[0.05, 0.0, 0.0], [0.02, 0.03, 0.0], [0.01, -0.01, 0.04]])  # Σ = SCALE SCALEᵀ, σ ≤ 0.06


def gaussian_features(n: int, mean: np.ndarray, scale: np.ndarray, seed: int) -> np.ndarray:
    """``n`` draws of N(mean, scale scaleᵀ); 0.5 ± 0.2 keeps them inside [0, 1] (over 3σ for every coordinate)."""
    features = mean + np.random.default_rng(seed).standard_normal((n, len(mean))) @ scale.T
    assert features.min() > 0 and features.max() < 1
    return features


def as_images(features: np.ndarray, size: int = 4) -> torch.Tensor:
    """Images (N, F, size, size) whose channel c is the constant ``features[:, c]``."""
    return torch.from_numpy(features)[:, :, None, None].expand(-1, -1, size, size).contiguous()


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)`` with scipy's matrix square root."""
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * linalg.sqrtm(sigma1 @ sigma2).real))


def unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """KID's squared MMD of whole sets with ``k(a, b) = (aᵀb / F + 1)³``: U-statistics within a set."""
    m, n_features = x.shape

    def kernel(a, b):
        return (a @ b.T / n_features + 1) ** 3

    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / m**2)


def test_fid_matches_the_frechet_distance_of_the_empirical_statistics():
    """torchmetrics uses the sample means and unbiased covariances, so the match is exact up to rounding."""
    x = gaussian_features(400, MEAN, SCALE, seed=0)
    y = gaussian_features(300, MEAN + [0.03, -0.02, 0.01], 0.7 * SCALE[::-1], seed=1)
    expected = frechet_distance(x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T))
    result = image_quality(as_images(x), as_images(y), POOL, batch_size=64)
    assert result["fid"] == pytest.approx(expected, rel=1e-9)
    assert abs(image_quality(as_images(x), as_images(x), POOL)["fid"]) < 1e-12


def test_fid_estimates_the_population_distance():
    """Equal covariances Σ, means δ apart: the population FID is ‖δ‖² (scipy's closed form gives the same).

    With N draws per set the covariance term is second order (its gradient vanishes at Σ1 = Σ2); the mean term
    ‖δ + e‖², e ~ N(0, 2Σ/N), has bias 2 tr Σ / N and standard deviation 2 √(δᵀ 2Σ δ / N) (delta method):
    allow the bias plus five standard deviations.
    """
    n, delta, sigma = 5000, np.array([0.03, -0.02, 0.01]), SCALE @ SCALE.T
    expected = frechet_distance(MEAN, sigma, MEAN + delta, sigma)
    assert expected == pytest.approx(delta @ delta, rel=1e-6)
    x = gaussian_features(n, MEAN, SCALE, seed=2)
    y = gaussian_features(n, MEAN + delta, SCALE, seed=3)
    tolerance = 2 * np.trace(sigma) / n + 5 * 2 * math.sqrt(delta @ (2 * sigma) @ delta / n)
    assert abs(image_quality(as_images(x), as_images(y), POOL, kid_subset_size=50)["fid"] - expected) < tolerance


def test_features_are_batched_without_changing_the_result():
    x, y = gaussian_features(50, MEAN, SCALE, seed=4), gaussian_features(40, MEAN + 0.05, SCALE, seed=5)
    whole = image_quality(as_images(x), as_images(y), POOL, batch_size=1000)
    batched = image_quality(as_images(x), as_images(y), POOL, batch_size=7)
    assert batched == pytest.approx(whole, rel=1e-12, abs=1e-15)


def test_kid_of_whole_sets_matches_the_unbiased_mmd():
    """With ``kid_subset_size`` above the set sizes every subset is a whole set (clamped): each of the 100 draws
    is a permutation of the same sets, so the mean is the MMD² of the sets and the spread is rounding."""
    x = gaussian_features(200, MEAN, SCALE, seed=6)
    y = gaussian_features(200, MEAN + [0.1, 0.0, -0.1], SCALE, seed=7)
    shifted = image_quality(as_images(x), as_images(y), POOL, kid_subset_size=1000)
    assert shifted["kid_mean"] == pytest.approx(unbiased_mmd2(x, y), rel=1e-9)
    assert shifted["kid_mean"] > 0 and shifted["kid_std"] < 1e-12

    # one set against itself: 2 (S/m − D) / (m(m − 1)) with S the sum and D the trace of its kernel matrix, ≤ 0
    # and of order k(x, x) / m²
    same = image_quality(as_images(x), as_images(x), POOL, kid_subset_size=1000)
    assert same["kid_mean"] == pytest.approx(unbiased_mmd2(x, x), rel=1e-9)
    assert -1e-2 * shifted["kid_mean"] < same["kid_mean"] <= 0


def test_kid_subsets_are_reproducible_and_close_to_the_whole_set_value():
    x = gaussian_features(300, MEAN, SCALE, seed=8)
    y = gaussian_features(300, MEAN + [0.1, 0.0, -0.1], SCALE, seed=9)
    first = image_quality(as_images(x), as_images(y), POOL, kid_subset_size=100, seed=1)
    assert first == image_quality(as_images(x), as_images(y), POOL, kid_subset_size=100, seed=1)
    assert first["kid_std"] > 0
    # the mean of 100 subset estimates, each unbiased for the population MMD² like the whole-set value
    assert first["kid_mean"] == pytest.approx(unbiased_mmd2(x, y), abs=5 * first["kid_std"])


@pytest.mark.parametrize("weights", [None, "missing/inception.pth"])
def test_missing_inception_weights_name_the_file_and_the_config_key(weights):
    images = torch.rand(4, 1, 8, 8)
    with pytest.raises(FileNotFoundError, match="evaluation.inception_weights") as error:
        image_quality(images, images, inception_weights=weights)
    assert "weights-inception-2015-12-05-6726825d.pth" in str(error.value)
    assert weights is None or weights in str(error.value)


def test_inception_loads_the_local_weights_file_and_never_downloads(random_inception_weights):
    """A weights file with torch-fidelity's architecture (random He-initialised weights, so that features stay of
    order one through the depth): the metric loads it strictly from disk, and the download function, if reached,
    fails the test. Different images get different features."""
    weights = random_inception_weights
    gray = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    no_download = mock.patch.object(
        feature_extractor_inceptionv3, "load_state_dict_from_url", side_effect=AssertionError("tried to download")
    )
    with no_download, mock.patch("torch.load", wraps=torch.load) as load:
        result = image_quality(gray[:2], gray[2:], inception_weights=weights)
    assert load.call_args.args[0] == str(weights)
    assert result["fid"] > 0 and math.isfinite(result["kid_mean"])


@pytest.mark.parametrize(
    ("images", "message"),
    [(torch.rand(4, 2, 8, 8), "C in"), (torch.rand(1, 1, 8, 8), "at least 2"), (torch.rand(4, 1, 8, 8) + 1, "[0, 1]")],
)
def test_image_quality_rejects_bad_images(images, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        image_quality(images, torch.rand(4, 1, 8, 8), POOL)


def test_linear_probe_separates_separable_classes_and_not_random_labels():
    rng = np.random.default_rng(10)
    features = rng.standard_normal((2000, 5))
    labels = (features @ [1.0, -2.0, 0.5, 0.0, 1.0] > 0).astype(int)
    assert linear_probe(features[:1000], labels[:1000], features[1000:], labels[1000:]) > 0.97
    random_labels = rng.integers(0, 2, 2000)
    # chance: 1000 test labels give a standard deviation of 0.016 around 0.5
    assert linear_probe(features[:1000], random_labels[:1000], features[1000:], random_labels[1000:]) == (
        pytest.approx(0.5, abs=0.08)
    )
    tensors = [torch.from_numpy(a) for a in (features[:1000], labels[:1000], features[1000:], labels[1000:])]
    assert linear_probe(*tensors) > 0.97


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((np.zeros((10, 3)), np.arange(9) % 2, np.zeros((4, 3)), np.arange(4) % 2), "train"),
        ((np.zeros((10, 3)), np.arange(10) % 2, np.zeros((4, 3)), np.arange(5) % 2), "test"),
        ((np.zeros((10, 3)), np.arange(10) % 2, np.zeros((4, 2)), np.arange(4) % 2), "features"),
        ((np.zeros((10, 3)), np.ones(10), np.zeros((4, 3)), np.arange(4) % 2), "2 classes"),
    ],
)
def test_linear_probe_rejects_bad_input(arguments, message):
    with pytest.raises(ValueError, match=message):
        linear_probe(*arguments)


@pytest.mark.parametrize("image_shape", [(1, 6, 5), (3, 6, 5), (6, 5)])
def test_plot_samples_draws_grayscale_and_rgb_images(tmp_path, image_shape):
    """Pure red pictures: drawn red with 3 channels; with one channel everything stays gray (R = G = B)."""
    red = torch.zeros(image_shape)
    red[0] = 1
    path = plot_samples(red.flatten().repeat(7, 1), torch.rand(7, 2), tmp_path / "samples.png", image_shape=image_shape)
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    is_red = (pixels[:, 0] > 200) & (pixels[:, 1:] < 50).all(1)
    assert is_red.any() == (len(image_shape) == 3 and image_shape[0] == 3)
    if not is_red.any():
        assert (pixels.max(1) - pixels.min(1) <= 1).all()


def test_plot_samples_rejects_other_channel_counts(tmp_path):
    with pytest.raises(ValueError, match="image_shape"):
        plot_samples(torch.rand(4, 2 * 6 * 5), torch.rand(4, 60), tmp_path / "samples.png", image_shape=(2, 6, 5))


@pytest.mark.parametrize(
    ("channels", "nrow", "grid", "upscale_to", "factor"),
    [(1, None, (3, 3), 1, 1), (3, 4, (4, 2), 1, 1), (1, None, (3, 3), 32, 5), (3, 4, (4, 2), 12, 2)],
)
def test_save_image_grid_writes_a_grid_of_the_right_size(tmp_path, channels, nrow, grid, upscale_to, factor):
    """torchvision pads every image with 2 pixels: (columns (f W + 2) + 2) × (rows (f H + 2) + 2), f the integer
    enlargement of images smaller than ``upscale_to``."""
    images = torch.rand(7, channels, 6, 5) * 3 - 1  # outside [0, 1] on purpose: clamped
    path = save_image_grid(images, tmp_path / "grid" / "samples.png", nrow=nrow, upscale_to=upscale_to)
    columns, rows = grid
    with Image.open(path) as image:
        assert image.size == (columns * (factor * 5 + 2) + 2, rows * (factor * 6 + 2) + 2)
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.min() == 0 and pixels.max() == 255
