"""Learning objectives: score estimators, higher (score-matching) and lower (posterior) losses."""

from eblvm.objectives.base import Objective
from eblvm.objectives.bidvl import BiDVL
from eblvm.objectives.contrastive_divergence import ContrastiveDivergence
from eblvm.objectives.noise_contrastive import NoiseContrastiveEstimation, VariationalNCE
from eblvm.objectives.score_matching import ScoreMatching

__all__ = [
    "BiDVL",
    "ContrastiveDivergence",
    "NoiseContrastiveEstimation",
    "Objective",
    "ScoreMatching",
    "VariationalNCE",
]
