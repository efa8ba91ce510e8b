"""Samplers: Gibbs for GRBMs, annealed Langevin dynamics for deep energies."""

from eblvm.sampling.gibbs import gibbs_sample
from eblvm.sampling.langevin import SAMPLING_MODES, LangevinSchedule, annealed_langevin, langevin_sample

__all__ = ["SAMPLING_MODES", "LangevinSchedule", "annealed_langevin", "gibbs_sample", "langevin_sample"]
