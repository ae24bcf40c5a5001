"""Learners (compression algorithms). Each module registers its class in LEARNERS on import."""

from learners.base import LEARNERS, Learner, LearnerContext, register_learner
from learners import full_precision  # noqa: F401  (registers full-prec)
from learners.channel_pruning import learner as channel_learner  # noqa: F401  (registers channel)

__all__ = ["LEARNERS", "Learner", "LearnerContext", "register_learner"]
