"""Energy models ``E(v, h)``."""

from eblvm.models.base import EnergyModel
from eblvm.models.deep import EBM, LatentEBM
from eblvm.models.gaussian_linear import GaussianLinear
from eblvm.models.generators import DCGANGenerator, ResNetGenerator
from eblvm.models.grbm import GRBM
from eblvm.models.spectral import SNConvEnergy, SNResNetEnergy

__all__ = [
    "EBM",
    "GRBM",
    "DCGANGenerator",
    "EnergyModel",
    "GaussianLinear",
    "LatentEBM",
    "ResNetGenerator",
    "SNConvEnergy",
    "SNResNetEnergy",
]
