"""Variational posteriors ``q_φ(h|v)``."""

from eblvm.posteriors.base import BoundPosterior, Posterior
from eblvm.posteriors.bernoulli import BernoulliFamily, ExactGRBMPosterior, RelaxedBernoulliPosterior
from eblvm.posteriors.encoder import GaussianEncoderPosterior
from eblvm.posteriors.gaussian import GaussianConvPosterior, GaussianMLPPosterior, GaussianPosterior
from eblvm.posteriors.gaussian_linear import ExactGaussianLinearPosterior

__all__ = [
    "BernoulliFamily",
    "BoundPosterior",
    "ExactGRBMPosterior",
    "ExactGaussianLinearPosterior",
    "GaussianConvPosterior",
    "GaussianEncoderPosterior",
    "GaussianMLPPosterior",
    "GaussianPosterior",
    "Posterior",
    "RelaxedBernoulliPosterior",
]
