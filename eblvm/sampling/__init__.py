"""Samplers: Gibbs for GRBMs."""

from eblvm.sampling.gibbs import gibbs_sample

__all__ = ["gibbs_sample"]
