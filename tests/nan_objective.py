"""An objective that turns non-finite on chosen training steps, for divergence tests."""

from __future__ import annotations

from eblvm.objectives.bidvl import BiDVL
from eblvm.objectives.score_matching import ScoreMatching


class NaNAtSteps(ScoreMatching):
    """The configured score-matching objective, whose training loss is NaN at the energy steps in ``nan_steps``
    (counted from 0 in this process); validation losses stay finite."""

    def __init__(self, nan_steps: list[int], **kwargs):
        super().__init__(**kwargs)
        self.nan_steps = set(nan_steps)
        self.training_calls = 0

    def higher_loss(self, model, q, v, generator):
        loss = super().higher_loss(model, q, v, generator)
        step, self.training_calls = self.training_calls, self.training_calls + 1
        return loss * float("nan") if step in self.nan_steps else loss

    def validation_loss(self, model, q, v, generator):
        return super().higher_loss(model, q, v, generator)


class BidvlNaNAtSteps(BiDVL):
    """BiDVL whose lower loss is NaN at the lower steps in ``nan_steps`` (counted from 0 in this process)."""

    def __init__(self, nan_steps: list[int], **kwargs):
        super().__init__(**kwargs)
        self.nan_steps = set(nan_steps)
        self.lower_calls = 0

    def lower_terms(self, *args, **kwargs):
        terms = super().lower_terms(*args, **kwargs)
        step, self.lower_calls = self.lower_calls, self.lower_calls + 1
        return terms | {"loss": terms["loss"] * float("nan")} if step in self.nan_steps else terms
