"""Figures: learned density beside the data (2-D), and model samples (2-D scatter or image grid)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from eblvm.models.base import EnergyModel  # noqa: E402


def _bounds(data: torch.Tensor, margin: float = 0.1) -> list[tuple[float, float]]:
    low, high = data.min(0).values, data.max(0).values
    pad = margin * (high - low)
    return [(float(lo - p), float(hi + p)) for lo, hi, p in zip(low, high, pad, strict=True)]


@torch.no_grad()
def plot_density(model: EnergyModel, log_z: float, data: torch.Tensor, path: Path, resolution: int = 200) -> Path:
    """Two panels on the data's box: a histogram of ``data`` and the model density ``exp(−F(v) − log Z)``."""
    (x0, x1), (y0, y1) = _bounds(data)
    xs = torch.linspace(x0, x1, resolution, dtype=data.dtype)
    ys = torch.linspace(y0, y1, resolution, dtype=data.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    param = next(model.parameters())
    density = torch.exp(-model.free_energy(grid.to(param)) - log_z).reshape(resolution, resolution).cpu()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 4))
    left.hist2d(data[:, 0].numpy(), data[:, 1].numpy(), bins=resolution // 2, range=[[x0, x1], [y0, y1]])
    left.set_title("data")
    right.imshow(density.numpy(), origin="lower", extent=(x0, x1, y0, y1), aspect="auto")
    right.set_title("model density")
    return _save(fig, path)


def plot_samples(
    samples: torch.Tensor,
    data: torch.Tensor,
    path: Path,
    image_shape: tuple[int, int] | None = None,
    max_images: int = 100,
) -> Path:
    """2-D: model samples over the data in one scatter. Otherwise a grid of the first ``max_images`` samples,
    each drawn as an ``image_shape`` picture."""
    samples = samples.detach().cpu()
    if samples.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(data[:, 0], data[:, 1], s=1, alpha=0.2, label="data")
        ax.scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.6, label="samples")
        (x0, x1), (y0, y1) = _bounds(data)
        ax.set(xlim=(x0, x1), ylim=(y0, y1), title="Gibbs samples")
        ax.legend(loc="upper right", markerscale=8)
        return _save(fig, path)
    if image_shape is None:
        raise ValueError(f"cannot draw {samples.shape[1]}-dimensional samples without data.image_shape")
    samples = samples[:max_images]
    n_cols = math.ceil(math.sqrt(len(samples)))
    n_rows = math.ceil(len(samples) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols, n_rows * image_shape[0] / image_shape[1]))
    for ax in axes.flat:
        ax.axis("off")
    for ax, sample in zip(axes.flat, samples, strict=False):
        ax.imshow(sample.reshape(image_shape).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
