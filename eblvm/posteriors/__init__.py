"""Variational posteriors ``q_φ(h|v)``."""

from eblvm.posteriors.base import BoundPosterior, Posterior
from eblvm.posteriors.bernoulli import BernoulliFamily, ExactGRBMPosterior, RelaxedBernoulliPosterior
from eblvm.posteriors.gaussian import GaussianMLPPosterior

__all__ = [
    "BernoulliFamily",
    "BoundPosterior",
    "ExactGRBMPosterior",
    "GaussianMLPPosterior",
    "Posterior",
    "RelaxedBernoulliPosterior",
]
