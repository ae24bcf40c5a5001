"""full-prec: no compression. It trains (or loads) the baseline, evaluates and exports it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from learners.base import Learner, register_learner


@dataclass(frozen=True)
class FullPrecisionConfig:
    """full-prec has no hyperparameters of its own; training is set in the train section."""


@register_learner
class FullPrecisionLearner(Learner):
    name = "full-prec"
    Config = FullPrecisionConfig
    targets = ()
    searches = False

    def compress(self, model: tf.keras.Model, hparams: Any) -> tf.keras.Model:
        return model
