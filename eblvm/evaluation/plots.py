"""Figures: learned density beside the data (2-D), and model samples (2-D scatter or image grid, PNG grid)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

from eblvm.atomic import replacing  # noqa: E402
from eblvm.models.base import EnergyModel  # noqa: E402


def _bounds(data: torch.Tensor, margin: float = 0.1) -> list[tuple[float, float]]:
    low, high = data.min(0).values, data.max(0).values
    pad = margin * (high - low)
    return [(float(lo - p), float(hi + p)) for lo, hi, p in zip(low, high, pad, strict=True)]


@torch.no_grad()
def _density_image(model: EnergyModel, log_z: float, bounds, resolution: int) -> torch.Tensor:
    """``exp(−F(v) − log Z)`` on a ``resolution × resolution`` grid over ``bounds`` (rows: second coordinate)."""
    (x0, x1), (y0, y1) = bounds
    param = next(model.parameters())
    xs = torch.linspace(x0, x1, resolution, dtype=param.dtype, device=param.device)
    ys = torch.linspace(y0, y1, resolution, dtype=param.dtype, device=param.device)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    return torch.exp(-model.free_energy(grid) - log_z).reshape(resolution, resolution).cpu()


def _draw_data(ax, data: torch.Tensor, bounds, resolution: int) -> None:
    (x0, x1), (y0, y1) = bounds
    ax.hist2d(data[:, 0].numpy(), data[:, 1].numpy(), bins=resolution // 2, range=[[x0, x1], [y0, y1]])
    ax.set_title("data")


def plot_density(model: EnergyModel, log_z: float, data: torch.Tensor, path: Path, resolution: int = 200) -> Path:
    """Two panels on the data's box: a histogram of ``data`` and the model density ``exp(−F(v) − log Z)``."""
    return plot_density_grid({"model density": (model, log_z)}, data, path, resolution)


def plot_density_grid(
    models: dict[str, tuple[EnergyModel, float]], data: torch.Tensor, path: Path, resolution: int = 200
) -> Path:
    """The data histogram, then each named model's density ``exp(−F(v) − log Z)``, on the data's box."""
    bounds = _bounds(data)
    n_panels = len(models) + 1
    n_cols = min(n_panels, 4)
    n_rows = math.ceil(n_panels / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols, 4 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    _draw_data(axes.flat[0], data, bounds, resolution)
    axes.flat[0].axis("on")
    (x0, x1), (y0, y1) = bounds
    for ax, (name, (model, log_z)) in zip(axes.flat[1:], models.items(), strict=False):
        ax.axis("on")
        ax.imshow(_density_image(model, log_z, bounds, resolution).numpy(), origin="lower", extent=(x0, x1, y0, y1))
        ax.set_title(name)
    return save_figure(fig, path)


def plot_samples(
    samples: torch.Tensor,
    data: torch.Tensor,
    path: Path,
    image_shape: tuple[int, ...] | None = None,
    max_images: int = 100,
) -> Path:
    """2-D: model samples over the data in one scatter. Otherwise a grid of the first ``max_images`` samples,
    each drawn as an ``image_shape`` picture: ``(H, W)`` or ``(C, H, W)`` with C = 1 (grayscale) or 3 (RGB)."""
    samples = samples.detach().cpu()
    if samples.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(data[:, 0], data[:, 1], s=1, alpha=0.2, label="data")
        ax.scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.6, label="samples")
        (x0, x1), (y0, y1) = _bounds(data)
        ax.set(xlim=(x0, x1), ylim=(y0, y1), title="Gibbs samples")
        ax.legend(loc="upper right", markerscale=8)
        return save_figure(fig, path)
    if image_shape is None:
        raise ValueError(f"cannot draw {samples.shape[1]}-dimensional samples without data.image_shape")
    image_shape = tuple(image_shape)
    if len(image_shape) == 2:
        image_shape = (1, *image_shape)
    if len(image_shape) != 3 or image_shape[0] not in (1, 3):
        raise ValueError(f"image_shape must be (H, W) or (C, H, W) with C in (1, 3), got {image_shape}")
    samples = samples[:max_images]
    n_cols = math.ceil(math.sqrt(len(samples)))
    n_rows = math.ceil(len(samples) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols, n_rows * image_shape[1] / image_shape[2]), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, sample in zip(axes.flat, samples, strict=False):
        picture = sample.reshape(image_shape).clamp(0, 1).permute(1, 2, 0).squeeze(-1)  # (H, W) or (H, W, 3)
        ax.imshow(picture.numpy(), cmap="gray", vmin=0, vmax=1)
    return save_figure(fig, path)


def save_image_grid(images: torch.Tensor, path: Path, nrow: int | None = None, upscale_to: int = 32) -> Path:
    """A PNG grid of images ``(N, C, H, W)`` in ``[0, 1]`` (clamped), ``nrow`` per row (``⌈√N⌉`` by default),
    with torchvision's 2-pixel padding: the sample grids of deep models. Images smaller than ``upscale_to``
    pixels are enlarged by the integer factor ``upscale_to // max(H, W)`` (nearest neighbour), so 8×8 digits can
    be seen; 1 keeps every size."""
    path = Path(path)
    images = images.detach().cpu()
    factor = max(1, upscale_to // max(images.shape[-2:]))
    if factor > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    nrow = math.ceil(math.sqrt(len(images))) if nrow is None else nrow
    with replacing(path) as partial:
        save_image(images.clamp(0, 1), partial, nrow=nrow, format="png")
    return path


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Write ``fig`` to ``path`` (its folder created, atomically) as a 100-dpi PNG and close it."""
    path = Path(path)
    try:
        fig.tight_layout()
        with replacing(path) as partial:
            fig.savefig(partial, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path
