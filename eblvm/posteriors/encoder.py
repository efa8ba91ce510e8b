"""BiDVL's Gaussian encoder ``q_ψ(h|v) = N(μ(v), diag σ²(v))`` on images (docs/methods.md §5), with a DCGAN or a
residual trunk and two 4×4 convolutional heads for ``μ`` and ``log σ²``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from eblvm.errors import require_choice, require_count
from eblvm.models.spectral import dcgan_init, image_stages
from eblvm.posteriors.gaussian import GaussianPosterior

TRUNKS = ("dcgan", "resnet")


def norm_act(channels: int) -> list[nn.Module]:
    """BatchNorm then LeakyReLU(0.2), the encoder's activation."""
    return [nn.BatchNorm2d(channels), nn.LeakyReLU(0.2)]


class EncoderDownBlock(nn.Module):
    """``BN → LReLU(0.2) → conv3×3 (in→out) → BN → LReLU(0.2) → conv3×3 (out→out) → AvgPool 2`` plus the
    shortcut ``conv1×1 (in→out) → AvgPool 2``; the convs are bias-free (a batch norm follows each)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.residual = nn.Sequential(
            *norm_act(in_channels),
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            *norm_act(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        )
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.residual(x) + self.shortcut(x), 2)


class GaussianEncoderPosterior(GaussianPosterior):
    """BiDVL's encoder: a trunk from images to a ``c·2^n``-channel 4×4 map, then two 4×4 valid conv heads to
    ``h_dim`` (with bias) for ``μ`` and ``log σ²``; ``forward`` returns ``(μ, log σ = ½ log σ²)``.

    ``trunk="dcgan"``: bias-free convs, each followed by BatchNorm and LeakyReLU(0.2): ``C → c`` 3×3 stride 1,
    then ``n`` 4×4 stride-2 convs to ``c·2^k`` channels (``k = 1..n``); at 32 px and ``channels = 48``: 3→48,
    48→96, 96→192, 192→384. ``trunk="resnet"``: the same with each stride-2 conv (and its batch norm and
    activation) replaced by an ``EncoderDownBlock``, and BatchNorm and LeakyReLU(0.2) after the last block.
    ``bounded_log_variance``: ``log σ² = −softplus(raw head)``, so ``σ ≤ 1``; else the raw head. Conv weights
    ``N(0, 0.02)``, batch norm (1, 0), biases 0.
    """

    def __init__(
        self,
        image_shape: Sequence[int] | None = None,
        h_dim: int = 100,
        trunk: str = "dcgan",
        channels: int = 48,
        bounded_log_variance: bool = False,
    ):
        image_shape, n_stages = image_stages(image_shape, "posterior=gaussian_encoder")
        require_choice("trunk", trunk, TRUNKS)
        require_count("channels", channels, 1)
        super().__init__(h_dim)
        self.image_shape = image_shape
        self.bounded_log_variance = bounded_log_variance
        layers: list[nn.Module] = [nn.Conv2d(image_shape[0], channels, 3, padding=1, bias=False), *norm_act(channels)]
        width = channels
        for k in range(1, n_stages + 1):
            out = channels * 2**k
            if trunk == "dcgan":
                layers += [nn.Conv2d(width, out, 4, stride=2, padding=1, bias=False), *norm_act(out)]
            else:
                layers.append(EncoderDownBlock(width, out))
            width = out
        if trunk == "resnet":
            layers += norm_act(width)
        self.trunk = nn.Sequential(*layers)
        self.mean_head = nn.Conv2d(width, h_dim, 4)
        self.log_variance_head = nn.Conv2d(width, h_dim, 4)
        dcgan_init(self)

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lead = v.shape[:-1]
        features = self.trunk(v.reshape(-1, *self.image_shape))
        mean = self.mean_head(features).reshape(*lead, self.h_dim)
        log_variance = self.log_variance_head(features).reshape(*lead, self.h_dim)
        if self.bounded_log_variance:
            log_variance = -F.softplus(log_variance)
        return mean, 0.5 * log_variance
