"""Variational posteriors ``q_φ(h|v)``."""

from eblvm.posteriors.base import BoundPosterior, Posterior
from eblvm.posteriors.bernoulli import BernoulliFamily, ExactGRBMPosterior, RelaxedBernoulliPosterior
from eblvm.posteriors.gaussian import GaussianConvPosterior, GaussianMLPPosterior, GaussianPosterior

__all__ = [
    "BernoulliFamily",
    "BoundPosterior",
    "ExactGRBMPosterior",
    "GaussianConvPosterior",
    "GaussianMLPPosterior",
    "GaussianPosterior",
    "Posterior",
    "RelaxedBernoulliPosterior",
]
