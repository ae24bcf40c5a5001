"""Learners (compression algorithms). Each module registers its class in LEARNERS on import."""

from learners.base import LEARNERS, Learner, LearnerContext, register_learner
from learners import full_precision  # noqa: F401  (registers full-prec)

__all__ = ["LEARNERS", "Learner", "LearnerContext", "register_learner"]
