"""BiDVL's generators ``v̂ = G_φ(ĥ)`` (docs/methods.md §5): a DCGAN generator and the SNGAN residual generator.

Both map latents ``ĥ`` of shape ``(..., B, h_dim)`` to flat image rows ``(..., B, C·H·W)`` in ``[−1, 1]`` (tanh),
folding the leading axes into the batch. They grow a 4×4 map by ``n = log2(H/4)`` stages that double its side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from eblvm.errors import require_count
from eblvm.models.spectral import dcgan_init, image_stages, xavier


class ImageGenerator(nn.Module):
    """Shared by the generators: keeps the sizes and applies ``self.images_of`` to latents of any leading shape."""

    def __init__(self, h_dim: int, image_shape: tuple[int, int, int]):
        super().__init__()
        require_count("h_dim", h_dim, 1)
        self.h_dim = h_dim
        self.image_shape = image_shape
        self.v_dim = math.prod(image_shape)

    def images_of(self, h: torch.Tensor) -> torch.Tensor:
        """Images ``(N, C, H, W)`` of latents ``(N, h_dim)``."""
        raise NotImplementedError

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        lead = h.shape[:-1]
        return self.images_of(h.reshape(-1, self.h_dim)).reshape(*lead, self.v_dim)


class DCGANGenerator(ImageGenerator):
    """BiDVL's DCGAN generator: transposed convolutions, each bias-free and followed by BatchNorm and ReLU, except
    the last, which has a bias and ends in tanh.

    ``h_dim → c·2^n`` with a 4×4 kernel (1×1 → 4×4), then ``n`` 4×4 stride-2 layers, layer ``k = 1..n`` giving
    ``c·2^(n+1−k)`` channels, then a 3×3 stride-1 transposed conv ``2c → C``. At 32 px and ``channels = 48``:
    h→384, 384→384, 384→192, 192→96, 96→3. Weights ``N(0, 0.02)``, batch norm (1, 0), biases 0.
    """

    def __init__(self, h_dim: int, image_shape: Sequence[int] | None = None, channels: int = 48):
        image_shape, n_stages = image_stages(image_shape, "generator=dcgan")
        require_count("channels", channels, 1)
        super().__init__(h_dim, image_shape)
        width = channels * 2**n_stages
        layers: list[nn.Module] = [nn.ConvTranspose2d(h_dim, width, 4, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        for k in range(1, n_stages + 1):
            out = channels * 2 ** (n_stages + 1 - k)
            layers += [nn.ConvTranspose2d(width, out, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(out)]
            layers.append(nn.ReLU())
            width = out
        layers += [nn.ConvTranspose2d(width, image_shape[0], 3, padding=1), nn.Tanh()]
        self.layers = nn.Sequential(*layers)
        dcgan_init(self.layers)

    def images_of(self, h: torch.Tensor) -> torch.Tensor:
        return self.layers(h[:, :, None, None])


class UpBlock(nn.Module):
    """SNGAN's generator block: ``BN → ReLU → nearest ×2 → conv3×3 → BN → ReLU → conv3×3`` plus the shortcut
    ``nearest ×2 → conv1×1``, all of ``channels`` channels. Xavier-uniform weights (gain √2 for the 3×3 convs,
    1 for the shortcut), batch norm (1, 0), biases 0."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1, self.norm2 = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)
        self.conv1 = xavier(nn.Conv2d(channels, channels, 3, padding=1), math.sqrt(2))
        self.conv2 = xavier(nn.Conv2d(channels, channels, 3, padding=1), math.sqrt(2))
        self.shortcut = xavier(nn.Conv2d(channels, channels, 1), 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv1(F.interpolate(F.relu(self.norm1(x)), scale_factor=2))
        residual = self.conv2(F.relu(self.norm2(residual)))
        return residual + self.shortcut(F.interpolate(x, scale_factor=2))


class ResNetGenerator(ImageGenerator):
    """The SNGAN residual generator: a linear map ``h_dim → 4·4·ch`` reshaped to a 4×4 map, ``n`` ``UpBlock``s,
    then BN, ReLU, a 3×3 conv ``ch → C`` and tanh. Xavier-uniform weights (gain 1 outside the blocks), batch
    norm (1, 0), biases 0."""

    def __init__(self, h_dim: int, image_shape: Sequence[int] | None = None, channels: int = 256):
        image_shape, n_stages = image_stages(image_shape, "generator=sngan_resnet")
        require_count("channels", channels, 1)
        super().__init__(h_dim, image_shape)
        self.channels = channels
        self.linear = xavier(nn.Linear(h_dim, 16 * channels), 1.0)
        self.blocks = nn.Sequential(*(UpBlock(channels) for _ in range(n_stages)))
        self.norm = nn.BatchNorm2d(channels)
        self.conv = xavier(nn.Conv2d(channels, image_shape[0], 3, padding=1), 1.0)

    def images_of(self, h: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.linear(h).reshape(-1, self.channels, 4, 4))
        return torch.tanh(self.conv(F.relu(self.norm(x))))
