"""Lightning callbacks: evaluation switched on by capability, EMA, and the last checkpoint."""

from eblvm.callbacks.base import EvaluationCallback
from eblvm.callbacks.ema import ParameterEMA
from eblvm.callbacks.figures import Figures
from eblvm.callbacks.generative import OutOfDistribution, Reconstructions
from eblvm.callbacks.images import ImageQuality, LinearProbe, SampleGrids
from eblvm.callbacks.last_checkpoint import LastCheckpoint
from eblvm.callbacks.metrics import GradientBias, LogLikelihood, PosteriorGap, SMObjective, Timing

__all__ = [
    "EvaluationCallback",
    "Figures",
    "GradientBias",
    "ImageQuality",
    "LastCheckpoint",
    "LinearProbe",
    "LogLikelihood",
    "OutOfDistribution",
    "ParameterEMA",
    "PosteriorGap",
    "Reconstructions",
    "SMObjective",
    "SampleGrids",
    "Timing",
]
