"""Channel pruning: graph analysis (which channels can go), surgery (a smaller model),
channel selection (L1, LASSO as in He et al. 2017, greedy) with least-squares reconstruction."""

from learners.channel_pruning.graph import Barrier, ChannelAnalysis, ChannelGroup, analyze
from learners.channel_pruning.selection import (
    CRITERIA, PruneInfo, greedy_keep, keep_counts, l1_keep, l1_scores, lasso_keep, prune_model,
)
from learners.channel_pruning.surgery import prune

__all__ = ["Barrier", "CRITERIA", "ChannelAnalysis", "ChannelGroup", "PruneInfo", "analyze", "greedy_keep",
           "keep_counts", "l1_keep", "l1_scores", "lasso_keep", "prune", "prune_model"]
