"""An experiment, not an option (docs/channel-recovery.md, 2026-12-05: it lost 0.9 points at 5 epochs):
main.py with one more channel criterion, ``l1refit``: the channels with the largest L1 filter norm (as
``l1``), then the least-squares re-fit of their readers (as ``lasso`` does). It separates what LASSO's
selection is worth at 5 epochs from what the re-fit costs.

    python scripts/experiments/l1_refit.py MAIN.PY ARGUMENTS --set channel.criterion=l1refit
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from learners.channel_pruning.criteria import L1Criterion, register_criterion  # noqa: E402
from pocketflow.cli import main  # noqa: E402


@register_criterion
class L1RefitCriterion(L1Criterion):
    name = "l1refit"
    reconstructs = True


sys.exit(main())
