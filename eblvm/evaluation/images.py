"""Image metrics: FID and KID of samples against real images (torchmetrics), and the linear probe of features."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


class InceptionFeatures(nn.Module):
    """The 2048 pool features of the FID Inception-v3 (TensorFlow's 2015-12-05 weights, as converted by
    torch-fidelity), read from a local file, for images ``(N, C, H, W)`` in ``[0, 1]``.

    Grayscale is repeated to three channels and the pixels are rounded to ``uint8``, which is what the network
    takes; it resizes to 299 × 299 like TensorFlow 1.x's bilinear resize (``antialias=False``), as the original
    FID code and torch-fidelity do, so numbers compare with published ones.
    """

    def __init__(self, weights: str | Path | None):
        super().__init__()
        if weights is None or not Path(weights).is_file():
            given = "no file given" if weights is None else f"{weights} does not exist"
            raise FileNotFoundError(
                f"FID/KID need the Inception-v3 weights as a local file ({given}): download torch-fidelity's "
                f"weights-inception-2015-12-05-6726825d.pth from {INCEPTION_URL} and set "
                "evaluation.inception_weights=/path/to/file"
            )
        from torchmetrics.image.fid import NoTrainInceptionV3  # imported when FID is computed, not at start-up

        self.net = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(weights), antialias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        return self.net((rgb * 255).round().to(torch.uint8))


class _Precomputed(nn.Identity):
    """Hands already extracted features to a torchmetrics metric, so that FID and KID share one feature pass."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


def _check_images(name: str, images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] not in (1, 3) or len(images) < 2:
        raise ValueError(f"{name} must be at least 2 images (N, C, H, W) with C in (1, 3), got {tuple(images.shape)}")
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"{name} must lie in [0, 1], got [{float(images.min())}, {float(images.max())}]")


@torch.no_grad()
def image_features(extractor: nn.Module, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """``extractor`` over ``images`` (``(N, C, H, W)`` in ``[0, 1]``) in batches of ``batch_size`` on the
    extractor's device; ``(N, F)`` float64 on the CPU."""
    device = next(extractor.parameters(), torch.empty(0)).device
    return torch.cat([extractor(batch.to(device)).double().cpu() for batch in images.split(batch_size)])


def fid_kid(
    real_features: torch.Tensor, fake_features: torch.Tensor, kid_subset_size: int = 1000, seed: int = 0
) -> dict[str, float]:
    """FID and KID from features ``(N, F)`` of real and fake images, through torchmetrics.

    With the means ``μ_r, μ_f`` and unbiased covariances ``Σ_r, Σ_f`` of the two sets' features::

        FID = ‖μ_r − μ_f‖² + tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^½)

    KID is the unbiased squared MMD with the kernel ``k(a, b) = (aᵀb / F + 1)³`` between random subsets of
    ``m = min(kid_subset_size, N_real, N_fake)`` real features ``x`` and fake features ``y``, averaged over
    torchmetrics' 100 subsets (``kid_mean``, with their standard deviation ``kid_std``), drawn with ``seed``::

        MMD² = Σ_{i≠j} [k(x_i, x_j) + k(y_i, y_j)] / (m(m − 1)) − 2 Σ_{i,j} k(x_i, y_j) / m²
    """
    n_features = real_features.shape[1]
    from torchmetrics.image.fid import FrechetInceptionDistance  # imported when used, not at start-up
    from torchmetrics.image.kid import KernelInceptionDistance

    fid = FrechetInceptionDistance(feature=_Precomputed(n_features))
    with warnings.catch_warnings():  # the features are already in memory: its warning about keeping them is moot
        warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance` will save all extracted features")
        kid = KernelInceptionDistance(
            feature=_Precomputed(n_features),
            subset_size=min(kid_subset_size, len(real_features), len(fake_features)),
        )
    for metric in (fid, kid):
        metric.update(real_features.cpu().double(), real=True)
        metric.update(fake_features.cpu().double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


def image_quality(
    real: torch.Tensor,
    fake: torch.Tensor,
    feature_extractor: nn.Module | None = None,
    inception_weights: str | Path | None = None,
    kid_subset_size: int = 1000,
    batch_size: int = 100,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """FID and KID (``fid_kid``) between ``real`` and ``fake`` images ``(N, C, H, W)`` in ``[0, 1]``.

    Features come from ``InceptionFeatures(inception_weights)``, or ``feature_extractor`` mapping images to
    ``(N, F)``, computed once per set in batches of ``batch_size`` on ``device`` (``real``'s by default; the
    extractor is moved there and put in eval mode) and shared by both metrics. Without Inception weights as a
    local file ``FileNotFoundError`` comes before any work: nothing is ever downloaded.
    """
    extractor = InceptionFeatures(inception_weights) if feature_extractor is None else feature_extractor
    _check_images("real", real)
    _check_images("fake", fake)
    extractor = extractor.to(real.device if device is None else torch.device(device)).eval()
    return fid_kid(
        image_features(extractor, real, batch_size), image_features(extractor, fake, batch_size), kid_subset_size, seed
    )


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def linear_probe(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    max_iter: int = 1000,
) -> float:
    """Test accuracy of a logistic regression on standardised features, fitted on the training features
    (docs/methods.md §8: train(+val) posterior means, tested on the test split)."""
    x_train, y_train = _as_numpy(train_features), _as_numpy(train_labels)
    x_test, y_test = _as_numpy(test_features), _as_numpy(test_labels)
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{split}: need features (N, F) and labels (N,), got {x.shape} and {y.shape}")
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"train has {x_train.shape[1]} features, test {x_test.shape[1]}")
    classes = np.unique(y_train)
    if len(classes) < 2:
        raise ValueError(f"the training labels need at least 2 classes, got {classes.tolist()}")
    from sklearn.linear_model import LogisticRegression  # imported when a probe is fitted, not at start-up
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    return float(probe.fit(x_train, y_train).score(x_test, y_test))
