"""Energy models ``E(v, h)``."""

from eblvm.models.base import EnergyModel
from eblvm.models.grbm import GRBM

__all__ = ["GRBM", "EnergyModel"]
