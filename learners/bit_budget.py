"""Per-layer bit widths under a global budget (parameter-weighted average bits).

The optimizer proposes a bit width per layer; ``project_bits`` moves the proposal onto the
budget while keeping its shape (which layers get more bits than others), the way the channel
learner projects pruning ratios onto a MAC target: every proposal becomes a feasible candidate,
so no trial is wasted on a miss.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping

from pocketflow.errors import ConfigError


def average_bits(bits: Mapping[str, float], sizes: Mapping[str, int]) -> float:
    """Parameter-weighted average bits of the layers in ``bits``."""
    total = sum(sizes[name] for name in bits)
    return sum(bits[name] * sizes[name] for name in bits) / total if total else 0.0


def project_bits(proposed: Mapping[str, float], sizes: Mapping[str, int], budget: float,
                 low: int = 2, high: int = 8) -> Dict[str, int]:
    """Integer bits in [low, high] per layer with average <= ``budget``, as close to it as possible.

    Starting from the rounded proposal, one bit at a time is taken from the layer furthest above
    its proposal (ties: the largest layer) among those whose bit does not overshoot what is still
    over the budget; when every layer would overshoot, from the smallest one. The slack left is
    then given back one bit at a time to the layers furthest below their proposal that still fit
    (ties: the smallest layer first). A proposal under a generous budget is raised the same way.
    """
    if not proposed:
        return {}
    if budget < low:
        raise ConfigError(f"a budget of {budget} bits is below the smallest width {low}; raise the target bits "
                          f"(or lower the target compression)")
    total = sum(sizes[name] for name in proposed)
    allowed = budget * total + 1e-9
    bits = {name: int(min(high, max(low, math.floor(value + 0.5)))) for name, value in proposed.items()}
    used = sum(bits[name] * sizes[name] for name in bits)
    while used > allowed:
        reducible = [n for n in bits if bits[n] > low]
        within = [n for n in reducible if sizes[n] <= used - allowed + 1e-9]
        if within:
            name = max(within, key=lambda n: (bits[n] - proposed[n], sizes[n], n))
        else:
            name = min(reducible, key=lambda n: (sizes[n], -(bits[n] - proposed[n]), n))
        bits[name] -= 1
        used -= sizes[name]
    changed = True
    while changed:
        changed = False
        for name in sorted(bits, key=lambda n: (bits[n] - proposed[n], sizes[n], n)):
            if bits[name] < high and used + sizes[name] <= allowed:
                bits[name] += 1
                used += sizes[name]
                changed = True
                break
    return bits
