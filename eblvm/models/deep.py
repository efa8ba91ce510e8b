"""Deep energies on images (docs/methods.md §2.2): the additive-coupling EBLVM and the latent-free EBM baseline.

Both read flat rows ``v`` of shape ``(..., B, C·H·W)`` (the data pipeline's format) and reshape them to images
for a pre-activation ELU ResNet ``R``. Leading axes (posterior particles) are folded into the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from eblvm.errors import require, require_count
from eblvm.models.base import EnergyModel

DEPTHS = {"resnet6": 2, "resnet9": 3}  # blocks per stage


class ResidualBlock(nn.Module):
    """Pre-activation block: ``ELU → conv(in→in, no bias) → ELU → conv(in→out) [→ AvgPool 2]`` plus the shortcut
    ``[AvgPool 2 →] conv1x1(in→out)``, which is present even when ``in == out``."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv2(F.elu(self.conv1(F.elu(x))))
        if self.downsample:
            residual, x = F.avg_pool2d(residual, 2), F.avg_pool2d(x, 2)
        return residual + self.shortcut(x)


class ResNet(nn.Module):
    """``R``: a 3×3 stem conv to ``C`` channels, then three stages ``C→2C→4C→8C`` of ``blocks_per_stage`` blocks
    each, the first of a stage down-sampling by 2. Output ``(N, 8C, H/8, W/8)``, no final activation."""

    def __init__(self, in_channels: int, channels: int, blocks_per_stage: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1)]
        width = channels
        for _ in range(3):
            layers.append(ResidualBlock(width, 2 * width, downsample=True))
            layers.extend(ResidualBlock(2 * width, 2 * width, downsample=False) for _ in range(blocks_per_stage - 1))
            width *= 2
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageEnergy(EnergyModel):
    """Shared by the deep energies: checks the image shape and runs ``R`` on flat rows of any leading shape."""

    def __init__(self, image_shape: Sequence[int] | None, channels: int, depth: str):
        super().__init__()
        require(
            image_shape is not None and len(image_shape) == 3,
            "data.image_shape",
            image_shape,
            "deep energies need image data: set data.image_shape to [channels, height, width]",
        )
        image_shape = tuple(int(n) for n in image_shape)
        n_channels, height, width = image_shape
        require(
            height % 8 == 0 and width % 8 == 0,
            "data.image_shape",
            list(image_shape),
            "height and width must be multiples of 8 (three stride-2 stages)",
        )
        require(depth in DEPTHS, "depth", depth, f"must be one of {sorted(DEPTHS)}")
        require_count("channels", channels, 1)
        self.image_shape = image_shape
        self.v_dim = math.prod(image_shape)
        self.features_dim = (height // 8) * (width // 8) * 8 * channels
        self.head_dim = (height // 8) * (width // 8) * 4 * channels
        self.resnet = ResNet(n_channels, channels, DEPTHS[depth])

    def resnet_features(self, v: torch.Tensor) -> torch.Tensor:
        """``flatten(R(v))`` for rows ``v`` of shape ``(..., d)``: ``(..., (H/8)(W/8)·8C)``."""
        lead = v.shape[:-1]
        images = v.reshape(-1, *self.image_shape)
        return self.resnet(images).reshape(*lead, self.features_dim)


class LatentEBM(ImageEnergy):
    """The BiSM paper's deep EBLVM: ``E(v,h) = Σ_j ELU(A·[f(v) + h ; h] + a)_j²`` with ``f(v) = Linear(flatten(R(v)))``.

    ``E ≥ 0``. ``h`` is continuous with ``h_dim`` units; the head ``A`` maps ``2·h_dim`` to ``(H/8)(W/8)·4C``.
    ``f(v)`` is computed once per distinct ``v`` and broadcast against particle axes of ``h``.
    """

    latent_type = "continuous"

    def __init__(
        self, image_shape: Sequence[int] | None = None, h_dim: int = 50, channels: int = 64, depth: str = "resnet6"
    ):
        super().__init__(image_shape, channels, depth)
        require_count("h_dim", h_dim, 1)
        self.h_dim = h_dim
        self.feature = nn.Linear(self.features_dim, h_dim)
        self.head = nn.Linear(2 * h_dim, self.head_dim)

    def forward(self, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self._head_energy(self.feature(self.resnet_features(v)), h)

    def _head_energy(self, f: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        f, h = torch.broadcast_tensors(f, h)
        return (F.elu(self.head(torch.cat([f + h, h], dim=-1))) ** 2).sum(-1)

    def conditional_energy(self, v: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``h ↦ E(v, h)`` with ``f(v)`` computed once: each call evaluates only the head."""
        f = self.feature(self.resnet_features(v))
        return lambda h: self._head_energy(f, h)


class EBM(ImageEnergy):
    """The latent-free baseline for MDSM: ``F(v) = Σ_j ELU(A·flatten(R(v)) + a)_j²``, ``A``: 8C → 4C per cell.

    It has no latent (``h_dim = 0``); ``forward(v, h)`` ignores ``h`` and the exact score is ``−∇_v F``.
    """

    has_free_energy = True
    h_dim = 0

    def __init__(self, image_shape: Sequence[int] | None = None, channels: int = 64, depth: str = "resnet6"):
        super().__init__(image_shape, channels, depth)
        self.head = nn.Linear(self.features_dim, self.head_dim)

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        return (F.elu(self.head(self.resnet_features(v))) ** 2).sum(-1)

    def forward(self, v: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        return self.free_energy(v)
