"""Gradual pruning (Zhu & Gupta 2017): sparsity rises from 0 to its final value along a
cubic (polynomial) curve while training goes on, masks recomputed every few steps from the
current magnitudes; between updates, and after the end step, the masks stay fixed.

s(t) = s_f + (s_i - s_f) * (1 - p)^power,  p = clip((t - begin) / (end - begin), 0, 1),
the same curve as TFMOT's ``PolynomialDecay``. Masks change at t = begin, begin + frequency,
... and always at t = end (so the final sparsity is reached exactly, which TFMOT only does
when end - begin is a multiple of the frequency).
"""

from __future__ import annotations

import logging
from typing import Dict, Mapping, Sequence

import numpy as np
from learners.weight_sparsification.masks import MaskSet, PrunableWeight, compute_masks

log = logging.getLogger(__name__)


def polynomial_sparsity(step: int, final_sparsity: float, begin_step: int, end_step: int,
                        initial_sparsity: float = 0.0, power: float = 3.0) -> float:
    """Sparsity at optimizer step ``step`` (0 before ``begin_step``, ``final`` from ``end_step`` on)."""
    if end_step <= begin_step:
        progress = 1.0 if step >= begin_step else 0.0
    else:
        progress = min(1.0, max(0.0, (step - begin_step) / (end_step - begin_step)))
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** power


def is_pruning_step(step: int, begin_step: int, end_step: int, frequency: int) -> bool:
    """Masks are recomputed at begin, every ``frequency`` steps after it, and at end."""
    if step < begin_step or step > end_step:
        return False
    return (step - begin_step) % max(1, frequency) == 0 or step == end_step


class FixedMasks:
    """``after_step`` hook: re-apply fixed masks after every optimizer step."""

    def __init__(self, masks: MaskSet) -> None:
        self.masks = masks

    def __call__(self) -> None:
        self.masks.apply()

    def finish(self) -> None:
        self.masks.apply()


class GradualPruning:
    """``after_step`` hook that prunes gradually towards ``final_zeros`` per tensor."""

    def __init__(self, masks: MaskSet, weights: Sequence[PrunableWeight], final_zeros: Mapping[str, int], *,
                 pattern: str, total_steps: int, begin: float, end: float, frequency: int,
                 power: float = 3.0) -> None:
        self.masks = masks
        self.weights = list(weights)
        self.final_zeros = dict(final_zeros)
        self.pattern = pattern
        self.begin_step = int(round(begin * total_steps))
        self.end_step = max(self.begin_step, int(round(end * total_steps)))
        self.frequency = max(1, int(frequency))
        self.power = power
        self.step = 0
        self.updates = 0

    def fraction(self, step: int) -> float:
        """Share of the final zeros in place at ``step`` (the curve with final sparsity 1)."""
        return polynomial_sparsity(step, 1.0, self.begin_step, self.end_step, 0.0, self.power)

    def zeros_at(self, step: int) -> Dict[str, int]:
        fraction = self.fraction(step)
        return {key: int(round(zeros * fraction)) for key, zeros in self.final_zeros.items()}

    def _prune(self, zeros: Mapping[str, int]) -> None:
        self.masks.update(compute_masks(self.masks.variables, self.weights, zeros, self.pattern))
        self.updates += 1

    def __call__(self) -> None:
        self.step += 1
        if is_pruning_step(self.step, self.begin_step, self.end_step, self.frequency):
            self._prune(self.zeros_at(self.step))
        self.masks.apply()

    def finish(self) -> None:
        """Training ended: make sure the final masks are in place (they are, unless it ended early)."""
        current = {key: int(np.sum(~mask)) for key, mask in self.masks.numpy().items()}
        if current != self.final_zeros:
            log.info("gradual pruning ended at step %d before its end step %d; applying the final masks",
                     self.step, self.end_step)
            self._prune(self.final_zeros)
        self.masks.apply()

