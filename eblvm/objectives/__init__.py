"""Learning objectives: score estimators, higher (score-matching) and lower (posterior) losses."""

from eblvm.objectives.score_matching import ScoreMatching

__all__ = ["ScoreMatching"]
