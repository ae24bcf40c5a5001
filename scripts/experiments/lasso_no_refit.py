"""An experiment, not an option (docs/channel-recovery.md, 2026-12-05): main.py with one more channel
criterion, ``lassonorefit``: LASSO's selection on the sampled contributions, only their varying part
counted (as for ``energy``: fine-tuning learns a constant back first), and the kept channels keep their
own weights, no re-fit. With ``l1_refit.py`` it separates what LASSO's selection is worth at 5 epochs
from what its re-fit costs.

    python scripts/experiments/lasso_no_refit.py MAIN.PY ARGUMENTS --set channel.criterion=lassonorefit
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from learners.channel_pruning.criteria import LassoCriterion, register_criterion  # noqa: E402
from pocketflow.cli import main  # noqa: E402


@register_criterion
class LassoWithoutRefit(LassoCriterion):
    name = "lassonorefit"
    reconstructs = False

    def keep(self, analysis, group, count, moments, centered):
        return super().keep(analysis, group, count, moments, centered=True)


sys.exit(main())
