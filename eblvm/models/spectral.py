"""BiDVL's energies on images (docs/methods.md §5): a spectrally normalised DCGAN-style CNN with a softplus output
and the SNGAN residual discriminator with a raw output.

Both read flat rows ``v`` of shape ``(..., B, C·H·W)`` and fold the leading axes into the batch. Images are square
with a side ``H`` that is a power of 2 and at least 8; the networks have ``n = log2(H/4)`` resolution stages, each
halving the side, so that the last feature map is 4×4 (32 px: three stages, 64 px: four, 8 px digits: one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from eblvm.errors import require, require_count
from eblvm.models.base import EnergyModel


def image_stages(image_shape: Sequence[int] | None, component: str) -> tuple[tuple[int, int, int], int]:
    """``image_shape`` as ``(C, H, W)`` and its number of stride-2 stages ``n = log2(H/4)``, after checking that it
    is a square image whose side is a power of 2 and at least 8; ``component`` (``model=sn_cnn_energy``) names the
    network in the error."""
    require(
        image_shape is not None and len(image_shape) == 3,
        "data.image_shape",
        image_shape,
        f"{component} needs image data: set data.image_shape to [channels, height, width]",
    )
    n_channels, height, width = (int(n) for n in image_shape)
    require(n_channels >= 1, "data.image_shape", [n_channels, height, width], f"{component} needs a channel or more")
    require(
        height == width and height >= 8 and height & (height - 1) == 0,
        "data.image_shape",
        [n_channels, height, width],
        f"{component} needs square images whose side is a power of 2 and at least 8",
    )
    return (n_channels, height, width), height.bit_length() - 3


def dcgan_init(module: nn.Module) -> None:
    """The DCGAN initialisation of every (transposed) convolution and batch norm in ``module``: weights
    ``N(0, 0.02)``, batch-norm scales 1, biases 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(layer.weight, 0.0, 0.02)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d | nn.BatchNorm2d) and layer.bias is not None:
            nn.init.zeros_(layer.bias)


def xavier(layer: nn.Conv2d | nn.Linear, gain: float) -> nn.Conv2d | nn.Linear:
    """``layer`` with a Xavier-uniform weight of ``gain`` and a zero bias."""
    nn.init.xavier_uniform_(layer.weight, gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _rebuilt(cls: type, arguments: dict[str, Any], state: dict[str, torch.Tensor], training: bool) -> nn.Module:
    """``cls(**arguments)`` (its random initialisation drawn apart from the global generators) with ``state``."""
    with torch.random.fork_rng():
        module = cls(**arguments)
    module.load_state_dict(state)
    return module.train(training)


class ImageRowsEnergy(EnergyModel):
    """Shared by the latent-free image energies: ``free_energy(v) = E(v)`` from ``self.energy_of_images`` on rows
    ``(..., d)`` reshaped to images, ``(...)`` out; ``forward(v, h)`` ignores ``h``.

    Spectrally normalised layers (torch parametrizations) refuse to be pickled, and spawned DDP workers receive
    the module by pickling: it is pickled as its constructor's ``arguments`` and its ``state_dict`` (weights and
    power-iteration vectors) and rebuilt from them.
    """

    latent_type = "continuous"
    has_free_energy = True
    h_dim = 0

    def __init__(self, image_shape: tuple[int, int, int], arguments: dict[str, Any]):
        super().__init__()
        self.image_shape = image_shape
        self.v_dim = math.prod(image_shape)
        self._arguments = arguments

    def __reduce__(self):
        return _rebuilt, (type(self), self._arguments, self.state_dict(), self.training)

    def energy_of_images(self, images: torch.Tensor) -> torch.Tensor:
        """``E`` of images ``(N, C, H, W)``, shape ``(N,)``."""
        raise NotImplementedError

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        lead = v.shape[:-1]
        return self.energy_of_images(v.reshape(-1, *self.image_shape)).reshape(lead)

    def forward(self, v: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        return self.free_energy(v)


class SNConvEnergy(ImageRowsEnergy):
    """BiDVL's DCGAN energy ``E(v) = softplus(D(v)) ≥ 0``, every convolution spectrally normalised and followed by
    LeakyReLU(``negative_slope``) except the last.

    With ``w_i = channels·2^i``, stage ``i = 0..n−1`` is a 3×3 stride-1 conv ``w_{i−1} → w_i`` (``w_{−1} = C``)
    and a 4×4 stride-2 conv ``w_i → w_i``; then a 3×3 conv ``w_{n−1} → 2w_{n−1}``, a 4×4 valid conv (4×4 → 1×1)
    and the head, 1×1 convs ``2w_{n−1} → 2w_{n−1} → 1``. At 32 px and ``channels = 64``: 3→64→64, 64→128→128,
    128→256→256, 256→512→512, head 512→512→1. Conv weights start ``N(0, 0.02)``, biases 0 (before spectral norm).
    """

    def __init__(self, image_shape: Sequence[int] | None = None, channels: int = 64, negative_slope: float = 0.1):
        image_shape, n_stages = image_stages(image_shape, "model=sn_cnn_energy")
        require_count("channels", channels, 1)
        require(0 <= negative_slope < 1, "negative_slope", negative_slope, "must be in [0, 1)")
        super().__init__(
            image_shape, {"image_shape": image_shape, "channels": channels, "negative_slope": negative_slope}
        )
        width = image_shape[0]
        convs: list[nn.Conv2d] = []
        for stage in range(n_stages):
            out = channels * 2**stage
            convs += [nn.Conv2d(width, out, 3, padding=1), nn.Conv2d(out, out, 4, stride=2, padding=1)]
            width = out
        convs += [nn.Conv2d(width, 2 * width, 3, padding=1), nn.Conv2d(2 * width, 2 * width, 4)]
        convs += [nn.Conv2d(2 * width, 2 * width, 1), nn.Conv2d(2 * width, 1, 1)]
        layers: list[nn.Module] = []
        for conv in convs:
            dcgan_init(conv)
            layers += [spectral_norm(conv), nn.LeakyReLU(negative_slope)]
        self.layers = nn.Sequential(*layers[:-1])

    def energy_of_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.layers(images)).reshape(-1)


class SNFirstBlock(nn.Module):
    """SNGAN's optimised first discriminator block: ``conv3×3 (in→out) → ReLU → conv3×3 → AvgPool 2`` plus the
    shortcut ``AvgPool 2 → conv1×1 (in→out)``; every conv spectrally normalised."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = spectral_norm(xavier(nn.Conv2d(in_channels, out_channels, 3, padding=1), math.sqrt(2)))
        self.conv2 = spectral_norm(xavier(nn.Conv2d(out_channels, out_channels, 3, padding=1), math.sqrt(2)))
        self.shortcut = spectral_norm(xavier(nn.Conv2d(in_channels, out_channels, 1), 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = F.avg_pool2d(self.conv2(F.relu(self.conv1(x))), 2)
        return residual + self.shortcut(F.avg_pool2d(x, 2))


class SNBlock(nn.Module):
    """SNGAN's discriminator block of constant width: ``ReLU → conv3×3 → ReLU → conv3×3 [→ AvgPool 2]`` plus the
    shortcut ``conv1×1 → AvgPool 2`` when it down-samples, else the identity; every conv spectrally normalised."""

    def __init__(self, channels: int, downsample: bool):
        super().__init__()
        self.conv1 = spectral_norm(xavier(nn.Conv2d(channels, channels, 3, padding=1), math.sqrt(2)))
        self.conv2 = spectral_norm(xavier(nn.Conv2d(channels, channels, 3, padding=1), math.sqrt(2)))
        self.shortcut = spectral_norm(xavier(nn.Conv2d(channels, channels, 1), 1.0)) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv2(F.relu(self.conv1(F.relu(x))))
        if self.shortcut is None:
            return residual + x
        return F.avg_pool2d(residual, 2) + F.avg_pool2d(self.shortcut(x), 2)


class SNResNetEnergy(ImageRowsEnergy):
    """The SNGAN residual discriminator as an energy with a raw (unbounded) output, for BiDVL's hinge loss.

    ``SNFirstBlock (C→ch)``, ``n − 1`` down-sampling ``SNBlock``s, two ``SNBlock``s at 4×4 without down-sampling,
    ReLU, a sum over spatial positions and a linear ``ch → 1``; every conv and the linear spectrally normalised.
    At 32 px: 32→16→8→4, then two blocks at 4×4. Xavier-uniform weights (gain √2 for the 3×3 convs, 1 for the
    shortcuts and the linear), biases 0.
    """

    def __init__(self, image_shape: Sequence[int] | None = None, channels: int = 128):
        image_shape, n_stages = image_stages(image_shape, "model=sn_resnet_energy")
        require_count("channels", channels, 1)
        super().__init__(image_shape, {"image_shape": image_shape, "channels": channels})
        self.blocks = nn.Sequential(
            SNFirstBlock(image_shape[0], channels),
            *(SNBlock(channels, downsample=True) for _ in range(n_stages - 1)),
            *(SNBlock(channels, downsample=False) for _ in range(2)),
        )
        self.linear = spectral_norm(xavier(nn.Linear(channels, 1), 1.0))

    def energy_of_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(F.relu(self.blocks(images)).sum((2, 3))).reshape(-1)
