"""Channel pruning: graph analysis (which channels can go), surgery (a smaller model),
channel selection (L1, LASSO as in He et al. 2017, greedy, or a registered criterion) with
least-squares reconstruction."""

from learners.channel_pruning.criteria import (
    CRITERIA, Criterion, greedy_keep, l1_keep, l1_scores, lasso_keep, register_criterion,
)
from learners.channel_pruning.graph import Barrier, ChannelAnalysis, ChannelGroup, analyze
from learners.channel_pruning.sampling import BaselineCache
from learners.channel_pruning.selection import PruneInfo, keep_counts, prune_model
from learners.channel_pruning.surgery import prune

__all__ = ["Barrier", "BaselineCache", "CRITERIA", "ChannelAnalysis", "ChannelGroup", "Criterion", "PruneInfo",
           "analyze", "greedy_keep", "keep_counts", "l1_keep", "l1_scores", "lasso_keep", "prune", "prune_model",
           "register_criterion"]
