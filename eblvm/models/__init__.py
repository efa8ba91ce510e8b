"""Energy models ``E(v, h)``."""

from eblvm.models.base import EnergyModel
from eblvm.models.deep import EBM, LatentEBM
from eblvm.models.gaussian_linear import GaussianLinear
from eblvm.models.grbm import GRBM

__all__ = ["EBM", "GRBM", "EnergyModel", "GaussianLinear", "LatentEBM"]
