"""full-prec: no compression. It trains (or loads) the baseline, evaluates and exports it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


from learners.base import Candidate, Learner, register_learner


@dataclass(frozen=True)
class FullPrecisionConfig:
    """full-prec has no hyperparameters of its own; training is set in the train section."""


@register_learner
class FullPrecisionLearner(Learner):
    name = "full-prec"
    Config = FullPrecisionConfig
    targets = ()
    searches = False

    def compress(self, hparams: Any) -> Candidate:
        return Candidate(self.baseline, hparams)
