"""Toy datasets: 2-D densities in (roughly) the unit square, and scikit-learn's 8x8 digits.

Each 2-D dataset draws ``n_train + n_val + n_test`` points at once from generators seeded with ``seed`` and
cuts the draw into train, val and test, so the splits are independent samples of one distribution. The
datasets not defined on [0, 1]^2 are moved there by a fixed map ``x -> 0.5 + scale * (x - center)`` (the same
for every split and seed, never fitted to the sample); each docstring gives its ``center`` and ``scale``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from eblvm.data.splits import Splits, require_sizes, split_by_fractions, split_rows
from eblvm.errors import require_count

RING_RADII = (0.25, 0.5, 0.75, 1.0)
# Offsets within a checkerboard cell stay this far from its edges, so no point rounds onto a neighbouring
# cell when cast to float32.
_CELL_MARGIN = 1e-6


def _to_splits(points: np.ndarray, n_train: int, n_val: int, center: tuple[float, float], scale: float) -> Splits:
    """Map ``points`` by ``x -> 0.5 + scale * (x - center)`` and cut them into the three splits."""
    unit_square = 0.5 + scale * (points - np.asarray(center))
    return split_rows(torch.as_tensor(unit_square, dtype=torch.float32), n_train, n_val)


def checkerboard(n_train: int = 50000, n_val: int = 10000, n_test: int = 10000, seed: int = 0, grid: int = 2) -> Splits:
    """Uniform on the cells ``(i, j)`` with ``i + j`` even of a ``grid`` x ``grid`` partition of [0, 1]^2.

    ``grid=2`` gives the squares [0, .5]^2 and [.5, 1]^2 (density 2 on them), the BiSM toy data.
    """
    n = require_sizes(n_train=n_train, n_val=n_val, n_test=n_test)
    require_count("splits.grid", grid, 1)
    rng = np.random.default_rng(seed)
    cells = np.array([(i, j) for i in range(grid) for j in range(grid) if (i + j) % 2 == 0])
    offsets = np.clip(rng.random((n, 2)), _CELL_MARGIN, 1 - _CELL_MARGIN)
    points = (cells[rng.integers(len(cells), size=n)] + offsets) / grid
    return _to_splits(points, n_train, n_val, center=(0.5, 0.5), scale=1.0)


def rings(n_train: int = 50000, n_val: int = 10000, n_test: int = 10000, seed: int = 0) -> Splits:
    """Four concentric circles (radii 0.25, 0.5, 0.75, 1; equal mass each) with isotropic N(0, 0.025^2) noise.

    Mapped with center (0, 0) and scale 0.45: radii 0.11 to 0.45 around (0.5, 0.5).
    """
    n = require_sizes(n_train=n_train, n_val=n_val, n_test=n_test)
    rng = np.random.default_rng(seed)
    radius = rng.choice(RING_RADII, size=n)
    angle = rng.uniform(0, 2 * math.pi, size=n)
    points = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    points += rng.normal(scale=0.025, size=(n, 2))
    return _to_splits(points, n_train, n_val, center=(0.0, 0.0), scale=0.45)


def moons(n_train: int = 50000, n_val: int = 10000, n_test: int = 10000, seed: int = 0) -> Splits:
    """scikit-learn's two moons (noise 0.05), which span [-1, 2] x [-0.5, 1] before noise.

    Mapped with center (0.5, 0.25) and scale 1/3.5: [0.07, 0.93] x [0.29, 0.71] before noise.
    """
    n = require_sizes(n_train=n_train, n_val=n_val, n_test=n_test)
    from sklearn.datasets import make_moons  # scikit-learn is imported only by the datasets that use it

    points, _ = make_moons(n_samples=n, noise=0.05, random_state=seed)
    return _to_splits(points, n_train, n_val, center=(0.5, 0.25), scale=1 / 3.5)


def swiss_roll(n_train: int = 50000, n_val: int = 10000, n_test: int = 10000, seed: int = 0) -> Splits:
    """The (x, z) coordinates of scikit-learn's Swiss roll (noise 0.25), which span about [-11, 15]^2.

    Mapped with center (1.5, 1.5) and scale 1/28: about [0.03, 0.98]^2.
    """
    n = require_sizes(n_train=n_train, n_val=n_val, n_test=n_test)
    from sklearn.datasets import make_swiss_roll

    points, _ = make_swiss_roll(n_samples=n, noise=0.25, random_state=seed)
    return _to_splits(points[:, [0, 2]], n_train, n_val, center=(1.5, 1.5), scale=1 / 28)


def eight_gaussians(n_train: int = 50000, n_val: int = 10000, n_test: int = 10000, seed: int = 0) -> Splits:
    """An equal mixture of eight N(mu_k, 0.1^2 I), mu_k at angle k * pi / 4 on the unit circle.

    Mapped with center (0, 0) and scale 1/3: means on a circle of radius 1/3 around (0.5, 0.5), std 1/30.
    """
    n = require_sizes(n_train=n_train, n_val=n_val, n_test=n_test)
    rng = np.random.default_rng(seed)
    angle = rng.integers(8, size=n) * math.pi / 4
    points = np.stack([np.cos(angle), np.sin(angle)], axis=1) + rng.normal(scale=0.1, size=(n, 2))
    return _to_splits(points, n_train, n_val, center=(0.0, 0.0), scale=1 / 3)


def digits(val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0) -> Splits:
    """scikit-learn's 1797 handwritten 8x8 digits (shipped with it), pixels / 16 in [0, 1]: d = 64, labels 0-9."""
    from sklearn.datasets import load_digits

    digits_set = load_digits()
    pixels = torch.as_tensor(digits_set.data / 16, dtype=torch.float32)
    labels = torch.as_tensor(digits_set.target, dtype=torch.int64)
    return split_by_fractions(pixels, val_fraction, test_fraction, seed, labels=labels)
