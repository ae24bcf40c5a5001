"""Learners (compression algorithms). Each module registers its class in LEARNERS on import."""

from learners.base import LEARNERS, Learner, LearnerContext, register_learner
from learners import full_precision  # noqa: F401  (registers full-prec)
from learners.channel_pruning import learner as channel_learner  # noqa: F401  (registers channel)
from learners.uniform_quantization import learner as uniform_learner  # noqa: F401  (registers uniform)
from learners.weight_sparsification import learner as weight_sparse_learner  # noqa: F401  (registers weight-sparse)
from learners.nonuniform_quantization import learner as nonuniform_learner  # noqa: F401  (registers non-uniform)
from learners.nonuniform_quantization import product as product_quant_learner  # noqa: F401  (registers product-quant)
from learners.chain import register_chains

register_chains()  # channel+uniform, ...: after the learners they are made of
from learners.weight_sparsification import int8_chain  # noqa: F401,E402  (registers weight-sparse+uniform)

__all__ = ["LEARNERS", "Learner", "LearnerContext", "register_learner"]
